"""Agreement with torch.optim.Adam / torch.optim.AdamW (foreach=False, CPU) over 300 steps.

fastadam does not promise torch's bits: its per-step scalars are rounded differently and it
multiplies by 1/sqrt(1 - beta2**t) where torch divides by sqrt(1 - beta2**t) (see
fastadam.reference), so one step may differ from torch's by an ulp or so, and these
differences add up. The gradients are fixed in advance and do not depend on the parameters,
so no difference is fed back chaotically: after t steps the parameters have drifted apart by
at most about t rounding errors of one update. Elementwise, with eps_T the dtype's epsilon,
G = max over the steps of |g| and lambda the L2 weight decay (0 for AdamW):

    |p_fa - p_torch| <= D = K_P * t * eps_T * (|p| + lr)       (|p|: rounding of p; lr: of
                                                                 the update, |update| <~ lr)
    |m_fa - m_torch| <= K_M * eps_T * (|m| + G) + lambda * D     (m is an average of the g's:
                        G covers m near a sign change; lambda * D is p's drift fed through L2)
    |v_fa - v_torch| <= K_V * eps_T * |v| + 2 * lambda * D * sqrt(v)   (v: a sum of positive
                        terms, no cancellation; d(g**2) = 2 g dg, and the weighted mean of |g|
                        is at most sqrt(v))

Measured (x86-64; the scalar, sse2 and avx2 paths give the same bits) as the largest value
over all elements, cases and 20 gradient seeds of |dp| / (t*eps_T*(|p| + lr)):
0.141 (float32), 0.130 (float64); of |dm| / (eps_T*(|m| + G)): 0.256, 0.271; of
|dv| / (eps_T*|v|) without L2: 3.14, 2.85. In plain ulps of p, up to ~300 after 300 steps
(elements with p near 0). K_P = 0.5, K_M = 1, K_V = 10 leave a factor ~3.5 for other
platforms' torch kernels (FMA, other vector widths) while staying at the rounding level:
half an ulp of drift per step.

A deliberately wrong update breaks these bounds (checked by hand with modified copies of
the reference): eps inside the square root, eps added before the bias correction
(eps_mode="hat"), eps doubled, the step count off by one, beta1 and 1 - beta1 swapped, no
bias correction, lr off by 1e-4 relative, L2 decay applied as decoupled, amsgrad or
maximize ignored (in the cases that use them). The gradients span 10**-6 .. 10 so that eps
matters for some elements.
"""

import functools

import numpy as np
import pytest

import fastadam

torch = pytest.importorskip(
    "torch", reason="torch is not installed: agreement with torch.optim is not checked"
)

SHAPES = [(7,), (3, 5), (2, 3, 4), (65,)]
STEPS = 300
LR = 1e-2
K_P, K_M, K_V = 0.5, 1.0, 10.0

# name: (torch/fastadam class name, options); lr=LR everywhere.
CASES = {
    "plain": ("Adam", {}),
    "l2": ("Adam", dict(weight_decay=1e-3)),
    "adamw": ("AdamW", dict(weight_decay=0.1)),
    "adamw_defaults": ("AdamW", {}),  # both default to weight_decay=1e-2
    "amsgrad": ("Adam", dict(amsgrad=True)),
    "maximize": ("Adam", dict(maximize=True)),
    "combo": (
        "AdamW",
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True),
    ),
    "combo_l2": ("Adam", dict(betas=(0.6, 0.9), eps=1e-7, weight_decay=0.02, amsgrad=True)),
}
DTYPES = [np.float32, np.float64]


@functools.cache
def _problem(dtype, seed=0):
    """Initial parameters and STEPS fixed gradients per parameter, generated once.

    Each element gets a magnitude 10**U(-6, 1) (some elements live where eps matters,
    some where it does not) and 5% of the gradients are exact zeros.
    """
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    scales = [10.0 ** rng.uniform(-6, 1, size=s) for s in SHAPES]
    grads = []
    for _ in range(STEPS):
        grads.append(
            [
                (rng.standard_normal(s) * sc * (rng.random(s) >= 0.05)).astype(dtype)
                for s, sc in zip(SHAPES, scales)
            ]
        )
    for a in params + [g for gs in grads for g in gs]:
        a.setflags(write=False)
    return params, grads


def _torch_run(dtype, cls, options, seed=0):
    params0, grads = _problem(dtype, seed)
    params = [torch.tensor(p) for p in params0]  # copies
    opt = getattr(torch.optim, cls)(params, lr=LR, foreach=False, **options)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    state = [opt.state[p] for p in params]
    return (
        [p.detach().numpy() for p in params],
        [s["exp_avg"].numpy() for s in state],
        [s["exp_avg_sq"].numpy() for s in state],
    )


def _fastadam_optim_run(dtype, cls, options, seed=0):
    params0, grads = _problem(dtype, seed)
    params = [p.copy() for p in params0]
    opt = getattr(fastadam, cls)(params, lr=LR, **options)
    for gs in grads:
        opt.step(gs)
    state = opt.state
    assert [s["step"] for s in state] == [STEPS] * len(params)
    return params, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]


def _fastadam_functional_run(dtype, cls, options, seed=0, step_fn=None):
    """The same through adam_step (step_fn: an adam_step-like function, for hand checks)."""
    step_fn = step_fn or fastadam.adam_step
    params0, grads = _problem(dtype, seed)
    kw = dict(options)
    if cls == "AdamW":
        kw.setdefault("weight_decay", 1e-2)
        kw["decoupled_weight_decay"] = True
    params = [p.copy() for p in params0]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    vmax = [np.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            step_fn(params[i], g, m[i], v[i], step=t, lr=LR, max_exp_avg_sq=vmax[i], **kw)
    return params, m, v


def _bounds(dtype, cls, options, tp, tm, tv):
    """The tolerances of the module docstring, elementwise, for each parameter."""
    e = float(np.finfo(dtype).eps)
    _, grads = _problem(dtype)
    wd = options.get("weight_decay", 0.0) if cls == "Adam" else 0.0  # L2 only
    out = []
    for i in range(len(SHAPES)):
        p, m, v = (np.abs(np.asarray(x[i], dtype=np.float64)) for x in (tp, tm, tv))
        G = np.max(np.abs(np.stack([gs[i] for gs in grads])), axis=0).astype(np.float64)
        drift = K_P * STEPS * e * (p + LR)  # the bound on |dp|
        out.append(
            (drift, K_M * e * (m + G) + wd * drift, K_V * e * v + 2.0 * wd * drift * np.sqrt(v))
        )
    return out


def _compare(dtype, cls, options, got, want):
    """Assert the bounds of the module docstring; return the fraction of each bound used."""
    used = {"p": 0.0, "m": 0.0, "v": 0.0}
    for i, bounds in enumerate(_bounds(dtype, cls, options, *want)):
        for j, (key, bound) in enumerate(zip("pmv", bounds)):
            x = np.asarray(got[j][i], dtype=np.float64)
            y = np.asarray(want[j][i], dtype=np.float64)
            assert np.all(np.isfinite(x))
            diff = np.abs(x - y)
            assert np.all(diff[bound == 0] == 0)  # v = 0: nothing was ever added to it
            frac = float(np.max(diff[bound > 0] / bound[bound > 0], initial=0.0))
            used[key] = max(used[key], frac)
            assert frac <= 1.0, (
                f"{key} of parameter {i} (shape {SHAPES[i]}) differs from "
                f"torch's by {frac:.3g} times the tolerance"
            )
    return used


@functools.cache
def _torch_result(dtype, name):
    cls, options = CASES[name]
    return _torch_run(dtype, cls, options)


@pytest.mark.parametrize("api", ["optim", "functional"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_matches_torch(dtype, name, api):
    cls, options = CASES[name]
    run = _fastadam_optim_run if api == "optim" else _fastadam_functional_run
    got = run(dtype, cls, options)
    want = _torch_result(dtype, name)
    for x, y in zip(got[0], want[0]):
        assert x.dtype == y.dtype == dtype
    _compare(dtype, cls, options, got, want)
    # Not vacuous: the parameters moved far more than the tolerance allows.
    moved = max(float(np.max(np.abs(x - p0))) for x, p0 in zip(got[0], _problem(dtype)[0]))
    assert moved > 1e3 * K_P * STEPS * np.finfo(dtype).eps * (1 + LR)


def test_state_dict_matches_torch_layout():
    """Same per-parameter state keys and step count as torch after a few steps."""
    params0, grads = _problem(np.float32)
    tparams = [torch.tensor(p) for p in params0]
    topt = torch.optim.Adam(tparams, lr=LR, amsgrad=True, foreach=False)
    fparams = [p.copy() for p in params0]
    fopt = fastadam.Adam(fparams, lr=LR, amsgrad=True)
    for gs in grads[:3]:
        for p, g in zip(tparams, gs):
            p.grad = torch.tensor(g)
        topt.step()
        fopt.step(gs)
    tsd, fsd = topt.state_dict(), fopt.state_dict()
    assert sorted(fsd["state"]) == sorted(tsd["state"])
    for i in tsd["state"]:
        assert set(fsd["state"][i]) == set(tsd["state"][i])
        assert fsd["state"][i]["step"] == int(tsd["state"][i]["step"]) == 3
        np.testing.assert_allclose(
            fsd["state"][i]["max_exp_avg_sq"], tsd["state"][i]["max_exp_avg_sq"].numpy(), rtol=1e-6
        )
    assert [g["params"] for g in fsd["param_groups"]] == [g["params"] for g in tsd["param_groups"]]
