"""The numerical contract: the C kernels equal fastadam.reference bit for bit, on every
SIMD path, thread count, chunking, size, alignment and with or without software prefetch."""

import numpy as np
import pytest

import fastadam
from fastadam import reference
from fastadam._options import check_options
from fastadam.functional import _step

# 1088 = 4096/4 + 64: the least float32 length whose prefetching loop runs (adam_kernel.h)
SIZES = [0, 1, 7, 8, 15, 16, 17, 63, 64, 65, 1000, 1088, 1153, 100003]
OPTIONS = {
    "default": {},
    "l2": dict(weight_decay=0.05),
    "adamw": dict(weight_decay=0.05, decoupled_weight_decay=True),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "hat": dict(eps_mode="hat", eps=1e-7),
    "no_bias_correction": dict(bias_correction=False),
    "grad_scale": dict(grad_scale=1024.0, weight_decay=0.01, decoupled_weight_decay=True),
    "everything": dict(
        lr=0.01,
        betas=(0.8, 0.99),
        eps=1e-6,
        weight_decay=0.1,
        amsgrad=True,
        maximize=True,
        eps_mode="hat",
    ),
    "beta_zero": dict(betas=(0.0, 0.0), lr=0.5),
}
DTYPES = [np.float32, np.float64]


def _options(kw):
    return check_options(
        kw.get("lr", 1e-3),
        kw.get("betas", (0.9, 0.999)),
        kw.get("eps", 1e-8),
        kw.get("weight_decay", 0.0),
        kw.get("decoupled_weight_decay", False),
        kw.get("amsgrad", False),
        kw.get("maximize", False),
        kw.get("bias_correction", True),
        kw.get("eps_mode", "paper"),
        kw.get("grad_scale", 1.0),
    )


def _buffers(rng, n, dtype, offset):
    """param, exp_avg, exp_avg_sq, max_exp_avg_sq with a non-trivial state, views
    starting `offset` elements into their allocation (offset 1: not 8-byte aligned
    for float64, not 16/32/64-byte aligned for any SIMD width)."""

    def view(a):
        buf = np.empty(n + offset, dtype)
        buf[offset:] = a
        return buf[offset:]

    p = rng.standard_normal(n)
    m = 0.1 * rng.standard_normal(n)
    v = 0.01 * rng.random(n)
    vmax = v * rng.choice([0.5, 2.0], n)
    return [view(a.astype(dtype)) for a in (p, m, v, vmax)]


def _grad(rng, n, dtype, t):
    g = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)
    if n > 20 and t == 2:  # special values: signed zeros, subnormals, huge
        g[:6] = [0.0, -0.0, 1e-40, -1e-310, 1e30, -1e30]
    return g.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_bitwise_equal_to_reference(isa, dtype, name, rng):
    kw = OPTIONS[name]
    options = _options(kw)
    # prefetch: -1 = the automatic choice, 1 = forced on (so that path runs on any machine)
    for threads, chunk, prefetch in [(1, 0, -1), (1, 0, 1), (2, 0, -1), (2, 16, 1), (3, 5, -1)]:
        for n in SIZES:
            for offset in (0, 1):
                fast = _buffers(rng, n, dtype, offset)
                ref = [a.copy() for a in fast]
                for t in (1, 2, 3):
                    g = _grad(rng, n, dtype, t)
                    _step(
                        fast[0],
                        g,
                        fast[1],
                        fast[2],
                        fast[3],
                        options,
                        t,
                        threads,
                        isa,
                        chunk,
                        prefetch=prefetch,
                    )
                    reference.adam_step(
                        ref[0], g, ref[1], ref[2], step=t, max_exp_avg_sq=ref[3], **kw
                    )
                for label, a, b in zip(
                    ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), fast, ref
                ):
                    assert np.array_equal(a, b, equal_nan=True), (
                        f"{label} differs: n={n} offset={offset} threads={threads} "
                        f"chunk={chunk} prefetch={prefetch}"
                    )


def test_reference_actually_moves(rng):
    # guards the test above against a reference and kernel that both do nothing
    p = np.ones(10, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fastadam.adam_step(p, np.ones_like(p), m, v, step=1, lr=0.1)
    # first step with bias correction: m_hat = g, v_hat = g^2, so p -= lr * 1/(1+eps)
    assert np.allclose(p, 0.9, rtol=1e-6)
    assert np.allclose(m, 0.1) and np.allclose(v, 0.001)


def test_non_finite_gradients_follow_ieee():
    p = np.ones(4, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    g = np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)
    fastadam.adam_step(p, g, m, v, step=1)
    assert np.isnan(p[:3]).all() and np.isfinite(p[3])
    assert m[0] == np.inf and m[1] == -np.inf and np.isnan(m[2])
    assert v[0] == np.inf and v[1] == np.inf and np.isnan(v[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_step_constants_match_reference(dtype):
    from fastadam import _core

    for kw in OPTIONS.values():
        for t in (1, 2, 10, 12345):
            o = _options(kw)
            hyper = (
                o.beta1,
                o.beta2,
                o.eps,
                o.decoupled_weight_decay,
                o.amsgrad,
                o.bias_correction,
                o.eps_mode,
                0.0,
            )
            c, variant = _core.rule_consts(
                0, o.lr, o.weight_decay, o.maximize, None, hyper, t, 1.0, o.grad_scale
            )
            r = reference.step_constants(t, **kw)
            # C's constants: grad_mul, the average's two, then the rule's in the
            # reference's order; its flags select the kernel variant.
            floats = [v for v in r if type(v) is float]
            assert c[0] == r.grad_mul and c[1] == c[2] == 0.0, (kw, t)
            assert c[3 : 3 + len(floats) - 1] == floats[1:], (kw, t)
            assert bool(variant & 4) == r.l2 and bool(variant & 8) == r.amsgrad


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_multi_block_one_call_equals_reference(isa, dtype, rng):
    """Many blocks of mixed sizes (a big one, tiny ones, empty ones) in two param groups
    with different options, split over 1..3 threads and small chunks: each block equals
    the reference applied to it alone."""
    sizes = [100003, 1, 0, 17, 64, 3000, 5, 0, 65, 7] + [3] * 40
    groups_kw = [
        dict(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True),
        dict(lr=0.003, betas=(0.5, 0.9), amsgrad=True, maximize=True),
    ]
    for threads, chunk, prefetch in [(1, 0, -1), (2, 0, 1), (3, 7, -1), (2, 1000, 1)]:
        params = [rng.standard_normal(n).astype(dtype) for n in sizes]
        ref_params = [p.copy() for p in params]
        half = len(params) // 2
        opt = fastadam.Adam(
            [
                dict(params=params[:half], **groups_kw[0]),
                dict(params=params[half:], **groups_kw[1]),
            ],
            num_threads=threads,
        )
        opt._isa, opt._chunk, opt._prefetch = isa, chunk, prefetch
        ref_state = [[np.zeros_like(p) for _ in range(3)] for p in params]
        for t in (1, 2, 3):
            grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
            opt.step(grads)
            for i, (p, g, (m, v, vm)) in enumerate(zip(ref_params, grads, ref_state)):
                kw = groups_kw[0 if i < half else 1]
                reference.adam_step(p, g, m, v, step=t, max_exp_avg_sq=vm, **kw)
        for i, (a, b) in enumerate(zip(params, ref_params)):
            assert np.array_equal(a, b), (
                f"block {i} (size {sizes[i]}) threads={threads} prefetch={prefetch}"
            )


def test_result_independent_of_threads_and_chunks_large(rng):
    """One large tensor (16 MiB of state) through every split the scheduler can make, with
    prefetching automatic, forced off and forced on."""
    n = 1 << 20
    base = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    results = []
    for threads, chunk, prefetch in [
        (1, 0, -1),
        (2, 0, -1),
        (3, 0, -1),
        (2, 1, -1),
        (3, 4097, 1),
        (2, n, 0),
        (1, 0, 0),
        (1, 0, 1),
        (2, 0, 1),
    ]:
        p, g = base[0].copy(), base[1]
        m, v = np.zeros_like(p), np.zeros_like(p)
        _step(p, g, m, v, None, _options({}), 1, threads, -1, chunk, prefetch=prefetch)
        results.append(p)
    for r in results[1:]:
        assert np.array_equal(r, results[0])
