"""Loss scaling, skipping non-finite steps and fused global-norm clipping."""

import math

import numpy as np
import pytest

import fastadam
from fastadam import _core, reference

CHUNK = 16384  # FA_NORM_CHUNK


def _emulated_sumsq(x):
    """fa_grad_stats' exact order for one block: per chunk, 16 lanes each summed in order
    (np.cumsum is sequential), lanes added 0..15, chunks added in order."""
    x = x.astype(np.float64).ravel()
    total = 0.0
    for c in range(0, x.size, CHUNK):
        chunk = x[c : c + CHUNK]
        lanes = [
            np.cumsum(chunk[j::16] * chunk[j::16])[-1] if chunk[j::16].size else 0.0
            for j in range(16)
        ]
        s = lanes[0]
        for v in lanes[1:]:
            s = s + v
        total = total + s
    return total


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_norm_exact_order_and_deterministic(isa, dtype, rng):
    x = (rng.standard_normal(3 * CHUNK + 77) * 10.0 ** rng.integers(-5, 5, 3 * CHUNK + 77)).astype(
        dtype
    )
    expected = _emulated_sumsq(x)
    for threads in (1, 2, 3):
        s, bad = _core.grad_stats([x], threads, isa)
        assert s == expected and not bad
    # many blocks: the same bits for every thread count and path, close to numpy's sum
    blocks = [rng.standard_normal(n).astype(dtype) for n in [100003, 1, 0, 17, 40000, 5] * 3]
    results = {_core.grad_stats(blocks, t, isa)[0] for t in (1, 2, 3)}
    assert len(results) == 1
    exact = sum(math.fsum(np.asarray(b, np.float64) ** 2) for b in blocks)
    assert results.pop() == pytest.approx(exact, rel=1e-12)


def test_grad_stats_flags_non_finite():
    g = [np.ones(100, np.float32), np.ones(70000, np.float32)]
    assert _core.grad_stats(g)[1] is False
    for bad in (np.inf, -np.inf, np.nan):
        g[1][54321] = bad
        assert _core.grad_stats(g, 2)[1] is True
        g[1][54321] = 1.0
    big = [np.full(10, 1e200)]  # the float64 sum of squares overflows, yet all are finite
    s, nonfinite = _core.grad_stats(big)
    assert s == np.inf and nonfinite is False


def test_skip_nonfinite_changes_nothing():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(n).astype(np.float32) for n in (10, 40000)]
    opt = fastadam.Adam(params, skip_nonfinite=True)
    grads = [np.ones_like(p) for p in params]
    assert opt.step(grads) is True
    before = [p.copy() for p in params], [dict(s) for s in opt.state]
    saved = {k: opt.state[1][k].copy() for k in ("exp_avg", "exp_avg_sq")}
    grads[1][123] = np.nan
    assert opt.step(grads) is False
    assert math.isnan(opt.last_grad_norm)
    assert all(np.array_equal(a, b) for a, b in zip(params, before[0]))
    assert [s["step"] for s in opt.state] == [1, 1]
    assert all(np.array_equal(opt.state[1][k], v) for k, v in saved.items())
    grads[1][123] = 1.0
    assert opt.step(grads) is True and [s["step"] for s in opt.state] == [2, 2]
    # functional form and the reference agree on skipping
    p, m, v = params[0].copy(), np.zeros(10, np.float32), np.zeros(10, np.float32)
    g = np.ones(10, np.float32)
    g[3] = np.inf
    assert fastadam.adam_step(p, g, m, v, step=1, skip_nonfinite=True) is False
    assert np.array_equal(p, params[0]) and not m.any() and not v.any()
    assert reference.adam_step(p, g, m, v, step=1, skip_nonfinite=True) is False
    assert fastadam.adam_step(p, np.ones(10, np.float32), m, v, step=1, skip_nonfinite=True) is True


def test_grad_scale_in_optimizer_equals_reference():
    rng = np.random.default_rng(1)
    p = rng.standard_normal(1000).astype(np.float32)
    q = p.copy()
    m, v = np.zeros_like(q), np.zeros_like(q)
    opt = fastadam.Adam([p])
    for t in range(1, 4):
        g = (rng.standard_normal(1000) * 65536).astype(np.float32)
        opt.step([g], grad_scale=65536.0)
        reference.adam_step(q, g, m, v, step=t, grad_scale=65536.0)
    assert np.array_equal(p, q)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step([g], grad_scale=0.0)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_fused_clipping_equals_reference_with_folded_coefficient(max_norm):
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(n).astype(np.float32) for n in (300, 20000)]
    ref = [p.copy() for p in params]
    state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    opt = fastadam.Adam(params, max_grad_norm=max_norm)
    for t in range(1, 4):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        before = [g.copy() for g in grads]
        opt.step(grads, grad_scale=8.0)
        assert all(np.array_equal(a, b) for a, b in zip(grads, before))  # not rewritten
        norm = math.sqrt(_core.grad_stats(grads)[0]) / 8.0
        assert opt.last_grad_norm == norm
        coef = max_norm / (norm + 1e-6)
        scale = 8.0 / coef if coef < 1.0 else 8.0
        for p, g, (m, v) in zip(ref, grads, state):
            reference.adam_step(p, g, m, v, step=t, grad_scale=scale)
    for a, b in zip(params, ref):
        assert np.array_equal(a, b)


def test_clip_grad_norm_numpy():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(n).astype(np.float32) for n in (50, 7000)]
    raw = [g.copy() for g in grads]
    exact = math.sqrt(sum(math.fsum(g.astype(np.float64) ** 2) for g in raw))
    norm = fastadam.clip_grad_norm_(grads, 1.0)
    assert norm == pytest.approx(exact, rel=1e-12)
    coef = np.float32(1.0 / (norm + 1e-6))
    for g, r in zip(grads, raw):
        assert np.array_equal(g, r * coef)
    assert math.sqrt(sum(math.fsum(g.astype(np.float64) ** 2) for g in grads)) == pytest.approx(
        1.0, rel=1e-6
    )
    small = [np.full(4, 0.1, np.float32)]
    assert fastadam.clip_grad_norm_(small, 1.0) == pytest.approx(0.2, rel=1e-7)
    assert np.all(small[0] == np.float32(0.1))  # below max_norm: untouched
    with pytest.raises(ValueError, match="max_norm"):
        fastadam.clip_grad_norm_(grads, -1.0)


def test_clipping_matches_torch():
    torch = pytest.importorskip("torch", reason="torch is needed to compare with clip_grad_norm_")
    rng = np.random.default_rng(4)
    shapes = [(64, 32), (32,), (10, 64)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = fastadam.Adam(params, lr=1e-2, max_grad_norm=1.0)
    topt = torch.optim.Adam(tparams, lr=1e-2, foreach=False)
    for _ in range(50):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.0, foreach=False)
        topt.step()
        opt.step(grads)
        assert opt.last_grad_norm == pytest.approx(float(tnorm), rel=1e-6)
    for p, tp in zip(params, tparams):
        # 50 steps of lr=1e-2: a few float32 ulps of the step per step, see test_torch.py
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=50 * 4 * 1.2e-7 * 1.0)
