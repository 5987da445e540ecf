"""fastadam.torch.Adam / AdamW against torch.optim.Adam / AdamW (foreach=False) on real models.

Unlike tests/test_torch.py (fixed gradients), the gradients here come from a model's
backward pass, so a difference in the parameters changes the next gradient: the two
trajectories are a closed loop. fastadam's update differs from torch's by about an ulp per
step (it multiplies by 1/sqrt(1 - beta2**t) where torch divides, see fastadam.reference),
and torch's own foreach and for-loop paths agree bit for bit, so the only source of
difference is that one rounding per step. Elementwise, with eps_T the dtype's machine
epsilon, t the number of steps since both optimizers held the same state and lr the
group's step size (|update| <~ lr):

    one step from the same state:  |p_fa - p_torch| <= K_STEP * eps_T * (|p| + lr)
    after t steps (trajectory):    |p_fa - p_torch| <= K_TRAJ * t * eps_T * (|p| + lr)

Measured on x86-64 (AVX2, torch 2.13, one torch thread), as the largest value over every
element and option combination of |dp| / (t * eps_T * (|p| + lr)) after 300 steps:
MLP 1.42 (float32), 1.83 (float64); small conv net 0.76 (float32), 0.81 (float64); in
absolute terms max |dp| = 4.2e-7 (float32), 7.8e-16 (float64). Of |dp| / (eps_T * (|p| + lr))
after one step from the same state: 0.95 (float32), 0.98 (float64), with 125 of 22516
float32 elements differing at all. With fused clipping (max_grad_norm, active at every step)
against clip_grad_norm_ + step: 2.01 (float32: torch computes the norm in float32, 1e-7
relative off fastadam's double-precision one), 0.58 (float64). Under GradScaler with
injected inf/NaN: 0.53, and 0.87 with clipping.
K_STEP = 2 and K_TRAJ = 4 leave a factor of ~2 for other platforms while staying at the
rounding level (a few ulp of drift per step); in plain numbers, after 300 float32 steps
|dp| <= 1.4e-4 * (|p| + lr), against parameters that moved by 0.1 to 0.4.

The setting keeps the closed loop out of a chaotic regime (lr = 1e-3, 300 steps, smooth
activations, a loss that is minimised: with maximize=True the loss is negated, so maximize
is exercised on a descent). In a chaotic regime (a much larger lr near an equilibrium, or
ascending an unbounded loss) any two implementations that differ by one rounding, including
two torch builds, separate exponentially and no ulp bound holds.

All 13 option combinations (weight decay none / L2 / decoupled x amsgrad x maximize, plus
other betas and eps) run at once: one independent copy of the network per combination, each
in its own param group with its own options, evaluated as one batched model.
"""

import copy
import io
import itertools
import pathlib
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")
import torch.nn.functional as F  # noqa: E402

import fastadam.torch  # noqa: E402
from fastadam.torch import Adam, AdamW  # noqa: E402

LR = 1e-3
STEPS = 300
K_STEP, K_TRAJ = 2.0, 4.0
DTYPES = [torch.float32, torch.float64]

COMBOS = [
    dict(weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams, maximize=mx)
    for (wd, dec), ams, mx in itertools.product(
        [(0.0, False), (1e-2, False), (0.1, True)], [False, True], [False, True]
    )
]
COMBOS.append(dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3))
C = len(COMBOS)
SHAPES = {
    "mlp": [(16, 32), (32,), (32, 32), (32,), (32, 4), (4,)],
    "cnn": [(6, 3, 3, 3), (6,), (8, 6, 3, 3), (8,), (72, 4), (4,)],
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: torch's threads only add contention (and timing noise)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- models
def _params(kind, dtype, copies=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (0.3 * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
            for s in SHAPES[kind]
        ]
        for _ in range(copies)
    ]


def _data(kind, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (32, 16) if kind == "mlp" else (8, 3, 8, 8)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape[0], 4, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _loss(kind, ps, x, y, signs=None):
    """Sum over the copies of each copy's MSE (times its sign). ps: a list of copies, each
    the list of SHAPES[kind] tensors: an MLP (tanh, gelu) or a conv net (two 3x3
    convolutions, tanh, gelu, a linear head), all copies evaluated as one batched model."""
    n = len(ps)

    def st(k):
        return torch.stack([p[k] for p in ps])

    if kind == "mlp":
        h = torch.tanh(torch.baddbmm(st(1)[:, None], x.expand(n, *x.shape), st(0)))
        h = F.gelu(torch.baddbmm(st(3)[:, None], h, st(2)))
    else:
        b = x.shape[0]
        h = torch.tanh(
            F.conv2d(
                x.repeat(1, n, 1, 1),
                torch.cat([p[0] for p in ps]),
                torch.cat([p[1] for p in ps]),
                padding=1,
                groups=n,
            )
        )
        h = F.gelu(
            F.conv2d(
                h, torch.cat([p[2] for p in ps]), torch.cat([p[3] for p in ps]), stride=2, groups=n
            )
        )
        h = h.reshape(b, n, 72).transpose(0, 1)
    out = torch.baddbmm(st(5)[:, None], h, st(4))
    per_copy = ((out - y) ** 2).mean(dim=(1, 2))
    if signs is not None:
        per_copy = per_copy * torch.tensor(signs, dtype=per_copy.dtype)
    return per_copy.sum()


def _signs(combos):
    return [-1.0 if c.get("maximize") else 1.0 for c in combos]


def _backward(kind, ps, x, y, signs=None):
    for p in (q for c in ps for q in c):
        p.grad = None
    _loss(kind, ps, x, y, signs).backward()


def _ratio(got, want, dtype, lr, t=1):
    """max |got - want| / (t * eps_T * (|want| + lr)) over all elements."""
    eps = torch.finfo(dtype).eps
    return max(
        float(((a.detach() - b.detach()).abs() / (t * eps * (b.detach().abs() + lr))).max())
        for a, b in zip(got, want)
    )


def _flat(ps):
    return [p for c in ps for p in c]


def _mlp(dtype=torch.float32, seed=0):
    """One plain MLP (a list of 6 tensors) and its data."""
    return _params("mlp", dtype, copies=1, seed=seed)[0], _data("mlp", dtype)


def _train(ps, opt, x, y, steps, before_step=None):
    for t in range(steps):
        _backward("mlp", [ps], x, y)
        if before_step is not None:
            before_step(t)
        opt.step()


# ------------------------------------------------------------------------ trajectories
def _trajectories(kind, dtype):
    pt, pf = _params(kind, dtype), _params(kind, dtype)
    p0 = [p.detach().clone() for p in _flat(pt)]
    x, y = _data(kind, dtype)
    signs = _signs(COMBOS)
    ot = torch.optim.Adam([dict(params=p, **c) for p, c in zip(pt, COMBOS)], lr=LR, foreach=False)
    of = Adam([dict(params=p, **c) for p, c in zip(pf, COMBOS)], lr=LR)
    for _ in range(STEPS):
        for ps, opt in ((pt, ot), (pf, of)):
            _backward(kind, ps, x, y, signs)
            opt.step()
    return pt, pf, p0, ot, of


def measure_trajectories():
    """{(kind, dtype): (max per-step ratio per combination, max |dp|)} (for the report)."""
    out = {}
    for kind, dtype in itertools.product(SHAPES, DTYPES):
        pt, pf, _, _, _ = _trajectories(kind, dtype)
        ratios = [_ratio(f, t, dtype, LR, STEPS) for t, f in zip(pt, pf)]
        dmax = max(
            float((a.detach() - b.detach()).abs().max()) for a, b in zip(_flat(pt), _flat(pf))
        )
        out[(kind, str(dtype))] = (ratios, dmax)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_trajectory_matches_torch(kind, dtype):
    pt, pf, p0, ot, of = _trajectories(kind, dtype)
    for c, (tc, fc) in enumerate(zip(pt, pf)):
        r = _ratio(fc, tc, dtype, LR, STEPS)
        assert r <= K_TRAJ, (
            f"{COMBOS[c]}: parameters differ from torch's by {r:.3g} "
            f"* t * eps * (|p| + lr); bound {K_TRAJ}"
        )
        for a in fc:
            assert a.dtype == dtype and torch.isfinite(a).all()
    # Not vacuous: every copy moved far more than the tolerance.
    eps = torch.finfo(dtype).eps
    for c in range(C):
        moved = max(float((a.detach() - b).abs().max()) for a, b in zip(pt[c], p0[c * 6 :]))
        assert moved > 100 * K_TRAJ * STEPS * eps * 2, COMBOS[c]
    # The same state as torch: keys, step counts, dtypes.
    for a, b in zip(_flat(pt), _flat(pf)):
        st, sf = ot.state[a], of.state[b]
        assert set(st) == set(sf)
        assert sf["step"].dtype == st["step"].dtype == torch.float32
        assert float(sf["step"]) == float(st["step"]) == STEPS
        assert sf["exp_avg"].dtype == dtype and sf["exp_avg"].shape == b.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_one_step_from_the_same_state(dtype):
    """Load torch's state after 50 steps; one step each from identical state and grads."""
    pt, pf = _params("mlp", dtype), _params("mlp", dtype)
    x, y = _data("mlp", dtype)
    signs = _signs(COMBOS)
    ot = torch.optim.Adam([dict(params=p, **c) for p, c in zip(pt, COMBOS)], lr=LR, foreach=False)
    for _ in range(50):
        _backward("mlp", pt, x, y, signs)
        ot.step()
    of = Adam([dict(params=p, **c) for p, c in zip(pf, COMBOS)], lr=LR)
    with torch.no_grad():
        for a, b in zip(_flat(pf), _flat(pt)):
            a.copy_(b)
    of.load_state_dict(copy.deepcopy(ot.state_dict()))
    _backward("mlp", pt, x, y, signs)
    for a, b in zip(_flat(pf), _flat(pt)):
        a.grad = b.grad.clone()
    before = [p.detach().clone() for p in _flat(pt)]
    ot.step()
    of.step()
    worst = 0.0
    for c, (tc, fc) in enumerate(zip(pt, pf)):
        r = _ratio(fc, tc, dtype, LR)
        worst = max(worst, r)
        assert r <= K_STEP, f"{COMBOS[c]}: one step differs by {r:.3g} eps (|p| + lr)"
    assert worst > 0 or dtype == torch.float64  # float32 does show the extra rounding
    assert any((a.detach() != b).any() for a, b in zip(_flat(pf), before))


def test_adamw_class_matches_torch():
    """fastadam.torch.AdamW (weight_decay=1e-2 by default, decoupled) vs torch.optim.AdamW."""
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot = torch.optim.AdamW(pt, lr=LR, foreach=False)
    of = AdamW(pf, lr=LR)
    assert of.param_groups[0]["weight_decay"] == 1e-2
    assert of.param_groups[0]["decoupled_weight_decay"] is True
    _train(pt, ot, x, y, 100)
    _train(pf, of, x, y, 100)
    assert _ratio(pf, pt, torch.float32, LR, 100) <= K_TRAJ


def test_constructor_matches_torch_signature():
    import inspect

    for mine, theirs in ((Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)):
        a = inspect.signature(mine.__init__).parameters
        b = inspect.signature(theirs.__init__).parameters
        for name, p in b.items():
            assert name in a, name
            assert a[name].default == p.default, name
            assert a[name].kind == p.kind, name
        assert list(a)[: len(b)] == list(b)
        assert a["max_grad_norm"].default is None and a["num_threads"].default is None


# --------------------------------------------------------------------- torch semantics
def test_import_fastadam_does_not_import_torch():
    code = "import sys, fastadam; fastadam.Adam; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_none_grads_are_skipped_as_torch():
    """Parameters with .grad None (some never, some now and then) behave as in torch:
    no state until their first gradient, their step count does not advance."""
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot, of = torch.optim.Adam(pt, lr=LR, foreach=False), Adam(pf, lr=LR)
    rng = np.random.default_rng(0)
    masks = [rng.random(6) < 0.3 for _ in range(60)]
    for m in masks:
        m[5] = True  # parameter 5 never gets a gradient

    for ps, opt in ((pt, ot), (pf, of)):
        _train(
            ps,
            opt,
            x,
            y,
            60,
            lambda t, ps=ps: [setattr(p, "grad", None) for p, off in zip(ps, masks[t]) if off],
        )
    for a, b in zip(pt, pf):
        assert set(ot.state[a]) == set(of.state[b])
        if ot.state[a]:
            assert float(of.state[b]["step"]) == float(ot.state[a]["step"]) < 60
    assert not of.state[pf[5]] and not ot.state[pt[5]]
    assert torch.equal(pf[5], _mlp()[0][5])  # untouched
    assert _ratio(pf, pt, torch.float32, LR, 60) <= K_TRAJ
    assert list(of.state_dict()["state"]) == list(ot.state_dict()["state"])


def test_zero_grad_hooks_and_closure():
    ps, (x, y) = _mlp()
    opt = Adam(ps, lr=LR)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = _loss("mlp", [ps], x, y)
        loss.backward()
        return loss.detach()

    losses = [opt.step(closure).item() for _ in range(20)]
    assert calls == ["pre", "post"] * 20
    assert losses[-1] < losses[0]
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    _backward("mlp", [ps], x, y)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ps)


def test_updates_in_place_with_one_call_into_c_per_step():
    """Zero copy: parameters and torch's state tensors are updated in place (same objects,
    same memory), by one call into C per step (over one plan per dtype for a mixed model)."""
    ps, (x, y) = _mlp()
    ps64 = [p.detach().double().requires_grad_() for p in _mlp(seed=3)[0]]
    opt = Adam([{"params": ps}, {"params": ps64, "lr": 2 * LR}], lr=LR)

    def backward():
        _backward("mlp", [ps], x, y)
        _backward("mlp", [ps64], x.double(), y.double())

    backward()
    opt.step()
    ptrs = {id(p): p.data_ptr() for p in ps + ps64}
    state = {id(p): {k: (v, v.data_ptr()) for k, v in opt.state[p].items()} for p in ps + ps64}

    calls = []
    real = fastadam._core.step_plans

    def counting(plans, *args):
        calls.append(len(plans))
        return real(plans, *args)

    fastadam._core.step_plans = counting
    try:
        before = [p.detach().clone() for p in ps + ps64]
        for _ in range(5):
            backward()
            opt.step()
    finally:
        fastadam._core.step_plans = real
    # one call into C per step, over both dtypes' plans (checked together, then updated)
    assert calls == [2] * 5
    for p, b in zip(ps + ps64, before):
        assert p.data_ptr() == ptrs[id(p)] and not torch.equal(p.detach(), b)
        for k, (v, ptr) in state[id(p)].items():
            assert opt.state[p][k] is v and v.data_ptr() == ptr
        assert float(opt.state[p]["step"]) == 6


def test_mixed_dtypes_and_complex_match_torch():
    """float32, float64 and complex64 parameters in one optimizer, against torch."""

    def make():
        g = torch.Generator().manual_seed(5)
        return [
            torch.randn(7, 3, generator=g).requires_grad_(),
            torch.randn(11, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(4, 5, generator=g, dtype=torch.complex64).requires_grad_(),
        ]

    def loss(ps, t):
        a, b, z = ps
        return (
            ((a - t) ** 2).sum()
            + (b.sin() * t).sum()
            + (z * z.conj()).real.sum() * 0.1
            + (z.abs() - t).pow(2).sum()
        )

    pt, pf = make(), make()
    ot = torch.optim.Adam(pt, lr=LR, foreach=False, amsgrad=True, weight_decay=0.01)
    of = Adam(pf, lr=LR, amsgrad=True, weight_decay=0.01)
    for t in range(100):
        for ps, opt in ((pt, ot), (pf, of)):
            opt.zero_grad()
            loss(ps, 0.01 * t).backward()
            opt.step()
    for a, b in zip(pf, pt):
        dtype = torch.float32 if a.dtype == torch.complex64 else a.dtype
        ra, rb = (torch.view_as_real(v.detach()) if v.is_complex() else v for v in (a, b))
        assert _ratio([ra], [rb], dtype, LR, 100) <= K_TRAJ


def test_add_param_group_midway_matches_torch():
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot = torch.optim.Adam(pt[:4], lr=LR, foreach=False)
    of = Adam(pf[:4], lr=LR)
    for ps, opt in ((pt, ot), (pf, of)):
        _train(ps, opt, x, y, 30)
        opt.add_param_group({"params": ps[4:], "lr": 3 * LR, "amsgrad": True})
        _train(ps, opt, x, y, 30)
    assert float(of.state[pf[0]]["step"]) == 60 and float(of.state[pf[4]]["step"]) == 30
    assert "max_exp_avg_sq" in of.state[pf[4]] and "max_exp_avg_sq" not in of.state[pf[0]]
    assert _ratio(pf, pt, torch.float32, 3 * LR, 60) <= K_TRAJ


def test_replaced_tensors_are_picked_up():
    """Replacing a state tensor, a state dict entry or a parameter's .data between steps is
    seen by the next step, as torch sees it."""
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot, of = torch.optim.Adam(pt, lr=LR, foreach=False), Adam(pf, lr=LR)
    for ps, opt in ((pt, ot), (pf, of)):
        _train(ps, opt, x, y, 10)
        opt.state[ps[0]]["exp_avg"] = torch.zeros_like(ps[0])
        opt.state[ps[1]] = {k: v.clone() for k, v in opt.state[ps[1]].items()}
        opt.state[ps[2]]["step"] = torch.tensor(3.0)
        ps[3].data = ps[3].data.clone()
        _train(ps, opt, x, y, 10)
    assert float(of.state[pf[2]]["step"]) == 13 and float(of.state[pf[0]]["step"]) == 20
    assert _ratio(pf, pt, torch.float32, LR, 20) <= K_TRAJ
    # in-place edits of state['step'] are seen too (torch's step tensor is the truth)
    for ps, opt in ((pt, ot), (pf, of)):
        opt.state[ps[4]]["step"].fill_(1.0)
        _train(ps, opt, x, y, 1)
    assert float(of.state[pf[4]]["step"]) == 2
    assert _ratio(pf, pt, torch.float32, LR, 21) <= K_TRAJ


def test_amsgrad_switched_on_midway():
    ps, (x, y) = _mlp()
    opt = Adam(ps, lr=LR)
    _train(ps, opt, x, y, 5)
    assert "max_exp_avg_sq" not in opt.state[ps[0]]
    opt.param_groups[0]["amsgrad"] = True  # torch.optim.Adam would raise KeyError here
    _train(ps, opt, x, y, 1)
    for p in ps:
        s = opt.state[p]
        assert torch.equal(s["max_exp_avg_sq"], s["exp_avg_sq"])  # max(0, v) = v


def test_lr_as_tensor_and_pickling():
    ps, (x, y) = _mlp()
    opt = Adam(ps, lr=torch.tensor(LR), max_grad_norm=1.5, num_threads=1)
    _train(ps, opt, x, y, 3)
    opt.param_groups[0]["lr"].fill_(2 * LR)  # what schedulers do to a tensor lr
    _train(ps, opt, x, y, 3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.max_grad_norm == 1.5 and clone.num_threads == 1
        assert float(clone.param_groups[0]["lr"]) == float(torch.tensor(2 * LR))
        assert float(next(iter(clone.state.values()))["step"]) == 6


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_unsupported_flags_raise(flag):
    with pytest.raises(NotImplementedError, match=flag):
        Adam(_mlp()[0], **{flag: True})


def test_foreach_and_fused_are_accepted():
    for kw in (dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False)):
        ps, (x, y) = _mlp()
        opt = Adam(ps, lr=LR, **kw)
        _train(ps, opt, x, y, 2)
        assert opt.param_groups[0]["foreach"] == kw.get("foreach")


@pytest.mark.parametrize(
    "bad",
    [
        dict(lr=-1.0),
        dict(lr=-1),
        dict(lr=float("nan")),
        dict(lr=torch.tensor(-0.5)),
        dict(lr=torch.tensor([1e-3, 1e-3])),
        dict(betas=(1.0, 0.999)),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(betas=(0.9, float("nan"))),
        dict(betas=(0.9, torch.tensor(0.999))),
        dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.999))),
        dict(eps=-1e-8),
        dict(eps=float("nan")),
        dict(weight_decay=-1),
        dict(weight_decay=-0.1),
        dict(lr="0.1"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_bad_hyperparameters_raise_as_torch(bad, cls):
    """The hyperparameters torch checks are refused with torch's exception type and
    message, so code and tests written against torch.optim keep working."""
    with pytest.raises(Exception) as want:
        getattr(torch.optim, cls)(_mlp()[0], **bad)
    with pytest.raises(want.type) as got:
        getattr(fastadam.torch, cls)(_mlp()[0], **bad)
    if want.type is ValueError:  # TypeErrors come from Python's own comparison
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (dict(lr=float("inf")), ValueError, "lr must be a finite number"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(num_threads=2**31), ValueError, "num_threads"),
        (dict(num_threads=1.0), TypeError, "num_threads"),
    ],
)
def test_bad_fastadam_options(bad, exc, match):
    with pytest.raises(exc, match=match):
        Adam(_mlp()[0], **bad)


def test_hyperparameters_changed_in_a_group_raise_as_torch_at_step_time():
    ps, (x, y) = _mlp()
    opt = Adam(ps)
    _backward("mlp", [ps], x, y)
    before = [p.detach().clone() for p in ps]
    for key, value, message in (
        ("lr", -1.0, "Invalid learning rate: -1.0"),
        ("eps", -1, "Invalid epsilon value: -1"),
        ("weight_decay", -2, "Invalid weight_decay value: -2"),
        ("betas", (0.9, 1.0), "Invalid beta parameter at index 1: 1.0"),
    ):
        saved = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError) as e:
            opt.step()
        assert str(e.value) == message
        assert not opt.state  # a refused first step leaves no state behind
        opt.param_groups[0][key] = saved
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: torch.zeros(3, device="meta", requires_grad=True), ValueError, "CPU"),
        (
            lambda: torch.zeros(3, dtype=torch.float8_e4m3fn).requires_grad_(),
            TypeError,
            "float8_e4m3fn",
        ),
        (lambda: torch.zeros(3, dtype=torch.int32), TypeError, "int32"),
        (lambda: torch.zeros(4, 5).t().requires_grad_(), ValueError, "not contiguous"),
        (lambda: torch.zeros(3, 3).to_sparse().requires_grad_(), ValueError, "sparse"),
    ],
)
def test_unsupported_parameters_are_rejected(make, exc, match):
    with pytest.raises(exc, match=match):
        Adam([make()])
    opt = Adam([torch.zeros(3, requires_grad=True)])
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [make()]})
    assert len(opt.param_groups) == 1


def test_bad_input_at_step_time():
    p = torch.zeros(3, 3, requires_grad=True)
    opt = Adam([p])
    p.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    p.grad = torch.ones(3, 3)
    opt.step()
    p.data = torch.zeros(3, 3, dtype=torch.float16)  # changed dtype under the optimizer
    p.grad = None
    p.grad = torch.ones(3, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"exp_avg.*float32.*must be a dense float16"):
        opt.step()  # (a float16 parameter is supported; its float32 state is not its own)
    q = torch.zeros(2, requires_grad=True)
    q.grad = torch.ones(2)
    opt2 = Adam([q])
    for bad in (0.0, float("inf"), -2.0):
        with pytest.raises(ValueError, match="grad_scale"):
            opt2.step(grad_scale=bad)
    assert not opt2.state[q] and torch.equal(q, torch.zeros(2))
    opt2.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt2.step()
    assert torch.equal(q, torch.zeros(2))


def test_non_contiguous_grad_is_read():
    p = torch.zeros(4, 3, requires_grad=True)
    q = torch.zeros(4, 3, requires_grad=True)
    g = torch.randn(3, 4).t()
    p.grad, q.grad = g, g.contiguous()
    a, b = Adam([p]), Adam([q])
    a.step()
    b.step()
    assert torch.equal(p, q)


# ------------------------------------------------------------------- state dicts
def _state_dict_roundtrip(sd):
    """Through torch.save / torch.load (weights_only, torch's default), like a checkpoint."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_layout_matches_torch():
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot = torch.optim.Adam(pt, lr=LR, amsgrad=True, foreach=None)
    of = Adam(pf, lr=LR, amsgrad=True)
    _train(pt, ot, x, y, 3)
    _train(pf, of, x, y, 3)
    st, sf = ot.state_dict(), of.state_dict()
    assert list(st) == list(sf) and list(st["state"]) == list(sf["state"])
    for i in st["state"]:
        assert list(st["state"][i]) == list(sf["state"][i])
        for k, v in st["state"][i].items():
            assert sf["state"][i][k].shape == v.shape and sf["state"][i][k].dtype == v.dtype
    assert st["param_groups"] == sf["param_groups"]


@pytest.mark.parametrize("direction", ["torch_to_fastadam", "fastadam_to_torch"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_checkpoints_are_interchangeable(direction, cls):
    """Train 100 steps with one, checkpoint model and optimizer (torch.save/torch.load),
    continue 100 steps with the other; compare with the first one continuing."""
    opts = dict(lr=LR, amsgrad=True, weight_decay=0.05)
    tcls, fcls = getattr(torch.optim, cls), {"Adam": Adam, "AdamW": AdamW}[cls]
    first, second = ((lambda p: tcls(p, foreach=False, **opts)), (lambda p: fcls(p, **opts)))
    if direction == "fastadam_to_torch":
        first, second = second, first
    (pa, (x, y)), (pb, _) = _mlp(), _mlp()
    oa = first(pa)
    _train(pa, oa, x, y, 100)
    ckpt = _state_dict_roundtrip({"params": [p.detach() for p in pa], "opt": oa.state_dict()})
    ob = second(pb)
    with torch.no_grad():
        for p, v in zip(pb, ckpt["params"]):
            p.copy_(v)
    ob.load_state_dict(ckpt["opt"])
    assert float(ob.state[pb[0]]["step"]) == 100
    _train(pa, oa, x, y, 1)
    _train(pb, ob, x, y, 1)
    assert _ratio(pb, pa, torch.float32, LR) <= K_STEP
    _train(pa, oa, x, y, 99)
    _train(pb, ob, x, y, 99)
    assert _ratio(pb, pa, torch.float32, LR, 100) <= K_TRAJ
    assert float(ob.state[pb[0]]["step"]) == float(oa.state[pa[0]]["step"]) == 200
    assert ob.state_dict()["param_groups"] == oa.state_dict()["param_groups"]


# ------------------------------------------------------------------- lr schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=15, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=60),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e / 10)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1e-2, total_steps=60, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers(name):
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot = torch.optim.Adam(pt, lr=LR, foreach=False)
    of = Adam(pf, lr=LR)
    seen = {"lr": set(), "beta1": set()}
    for ps, opt in ((pt, ot), (pf, of)):
        sched = SCHEDULERS[name](opt)
        for _ in range(60):
            _backward("mlp", [ps], x, y)
            opt.step()
            sched.step()
            seen["lr"].add(opt.param_groups[0]["lr"])
            seen["beta1"].add(opt.param_groups[0]["betas"][0])
    assert len(seen["lr"]) > 3
    if name == "OneCycleLR":
        assert len(seen["beta1"]) > 3  # betas change every step
    assert _ratio(pf, pt, torch.float32, 1e-2, 60) <= K_TRAJ


def test_one_cycle_betas_are_used():
    """Control for test_lr_schedulers: fastadam ignoring the cycled betas would fail it."""
    (pt, (x, y)), (pf, _) = _mlp(), _mlp()
    ot, of = torch.optim.Adam(pt, lr=LR, foreach=False), Adam(pf, lr=LR)
    for ps, opt, cycle in ((pt, ot, True), (pf, of, False)):
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=1e-2,
            total_steps=60,
            cycle_momentum=cycle,
            base_momentum=0.8,
            max_momentum=0.95,
        )
        for _ in range(60):
            _backward("mlp", [ps], x, y)
            opt.step()
            sched.step()
    assert _ratio(pf, pt, torch.float32, 1e-2, 60) > 100 * K_TRAJ


# ----------------------------------------------------------------- loss scaling (AMP)
def test_grad_scale_and_found_inf_arguments():
    """step(grad_scale=s) on s*g equals step() on g bit for bit when s is a power of two;
    found_inf != 0 changes nothing at all."""
    (pa, (x, y)), (pb, _) = _mlp(), _mlp()
    oa, ob = Adam(pa, lr=LR, amsgrad=True), Adam(pb, lr=LR, amsgrad=True)
    for _t in range(10):
        _backward("mlp", [pa], x, y)
        _backward("mlp", [pb], x, y)
        for p in pb:
            p.grad.mul_(1024.0)
        oa.step()
        ob.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k in oa.state[a]:
            assert torch.equal(oa.state[a][k], ob.state[b][k])
    snap = copy.deepcopy((list(ob.state.values()), [p.detach() for p in pb]))
    _backward("mlp", [pb], x, y)
    ob.step(grad_scale=1024.0, found_inf=torch.tensor(1.0))
    for s, s0 in zip(ob.state.values(), snap[0]):
        for k in s:
            assert torch.equal(s[k], s0[k])
    for p, p0 in zip(pb, snap[1]):
        assert torch.equal(p.detach(), p0)
    # not a power of two: s*g and g/s round, so the result is within one step's bound
    (pc, _), (pd, _) = _mlp(), _mlp()
    oc, od = Adam(pc, lr=LR), Adam(pd, lr=LR)
    _backward("mlp", [pc], x, y)
    _backward("mlp", [pd], x, y)
    for p in pd:
        p.grad.mul_(3.0)
    oc.step()
    od.step(grad_scale=3.0)
    assert _ratio(pd, pc, torch.float32, LR) <= K_STEP


def _amp_run(make_opt, fused, inject, scaler_kw, steps=120, clip=None, manual=None):
    """Train under GradScaler; manual (default: not fused): scaler.unscale_ and
    clip_grad_norm_ before scaler.step, torch's recipe for clipping with loss scaling."""
    manual = (not fused) if manual is None else manual
    ps, (x, y) = _mlp()
    opt = make_opt(ps)
    scaler = torch.amp.GradScaler("cpu", **scaler_kw)
    scales, skipped_unchanged, grads_left_scaled = [], [], []
    for t in range(steps):
        opt.zero_grad()
        scaler.scale(_loss("mlp", [ps], x, y)).backward()
        if t in inject:
            ps[t % 6].grad.view(-1)[t % 4] = float("inf") if t % 2 else float("nan")
        raw = [p.grad.clone() for p in ps]
        snap = (copy.deepcopy(list(opt.state.values())), [p.detach().clone() for p in ps])
        if clip is not None and manual:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, clip)
        scaler.step(opt)
        scales.append(scaler.get_scale())
        scaler.update()
        if t in inject:
            same = all(torch.equal(p.detach(), p0) for p, p0 in zip(ps, snap[1])) and all(
                all(torch.equal(s[k], s0[k]) for k in s)
                for s, s0 in zip(opt.state.values(), snap[0])
            )
            skipped_unchanged.append(same)
        elif fused and not manual:
            # the fused protocol leaves the gradients scaled: no unscale pass over them
            grads_left_scaled.append(all(torch.equal(p.grad, r) for p, r in zip(ps, raw)))
    return ps, opt, scales, skipped_unchanged, grads_left_scaled


@pytest.mark.parametrize("clip", [None, 0.5])
def test_grad_scaler(clip):
    """torch.amp.GradScaler("cpu") with fastadam (fused protocol: grad_scale and found_inf
    read at step time) vs with torch.optim.Adam (unscale_, then step when finite), with
    inf/NaN injected at some steps; with clip, fastadam's max_grad_norm vs torch's
    unscale_ + clip_grad_norm_."""
    inject = {5, 40, 41, 77}
    kw = dict(init_scale=2.0**12, growth_interval=10)
    t_ps, t_opt, t_scales, t_same, _ = _amp_run(
        lambda p: torch.optim.Adam(p, lr=LR, foreach=False), False, inject, kw, clip=clip
    )
    f_ps, f_opt, f_scales, f_same, f_scaled = _amp_run(
        lambda p: Adam(p, lr=LR, max_grad_norm=clip), True, inject, kw, clip=clip
    )
    assert f_scales == t_scales and len(set(f_scales)) > 3  # the scale grew and backed off
    assert f_same == t_same == [True] * len(inject)  # skipped steps changed nothing
    assert f_scaled and all(f_scaled)
    steps = 120 - len(inject)
    for a, b in zip(f_ps, t_ps):
        assert float(f_opt.state[a]["step"]) == float(t_opt.state[b]["step"]) == steps
    assert _ratio(f_ps, t_ps, torch.float32, LR, steps) <= K_TRAJ


def test_grad_scaler_after_manual_unscale():
    """torch's recipe unchanged (scaler.unscale_, clip_grad_norm_, scaler.step): GradScaler
    then hands fastadam grad_scale=None (already unscaled) and found_inf."""
    inject = {7, 30}
    kw = dict(init_scale=2.0**12, growth_interval=10)
    t_ps, _t_opt, t_scales, t_same, _ = _amp_run(
        lambda p: torch.optim.Adam(p, lr=LR, foreach=False), False, inject, kw, steps=60, clip=0.5
    )
    f_ps, f_opt, f_scales, f_same, _ = _amp_run(
        lambda p: Adam(p, lr=LR), True, inject, kw, steps=60, clip=0.5, manual=True
    )
    assert f_scales == t_scales and f_same == t_same == [True, True]
    assert float(f_opt.state[f_ps[0]]["step"]) == 58
    assert _ratio(f_ps, t_ps, torch.float32, LR, 58) <= K_TRAJ


# ---------------------------------------------------------------------- clipping
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_max_grad_norm_matches_clip_grad_norm(dtype):
    (pt, _), (pf, _) = _mlp(dtype), _mlp(dtype)
    x, y = _data("mlp", dtype)
    max_norm = 0.05  # the gradient norm falls from 5.6 to 0.04 over the 300 steps
    ot = torch.optim.Adam(pt, lr=LR, foreach=False, weight_decay=0.01)
    of = Adam(pf, lr=LR, weight_decay=0.01, max_grad_norm=max_norm)
    clipped, rel = 0, 0.0
    for _t in range(STEPS):
        _backward("mlp", [pt], x, y)
        _backward("mlp", [pf], x, y)
        norm = float(torch.nn.utils.clip_grad_norm_(pt, max_norm))
        clipped += norm > max_norm
        ot.step()
        raw = [p.grad.clone() for p in pf]
        of.step()
        assert all(torch.equal(p.grad, r) for p, r in zip(pf, raw))  # grads not rewritten
        fnorm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(r.double()) for r in raw])
        ).item()
        rel = max(rel, abs(of.last_grad_norm - fnorm) / fnorm)
    assert clipped > STEPS // 2
    assert rel < 1e-13  # fastadam's norm is computed in double whatever the dtype
    assert _ratio(pf, pt, dtype, LR, STEPS) <= K_TRAJ


def _clip_in_double(params, max_norm):
    """clip_grad_norm_ with the norm computed in double for every dtype (torch computes a
    float32 group's norm in float32: its coefficient is then off by ~1e-7 relative, which
    is far beyond float64's rounding level for the float64 parameters)."""
    grads = [p.grad for p in params]
    norm = float(torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def test_max_grad_norm_across_dtypes():
    """One global norm over float32 and float64 parameters (two plans)."""
    (a, (x, y)), (b, _) = _mlp(), _mlp()
    a64, b64 = ([p.detach().double().requires_grad_() for p in _mlp(seed=3)[0]] for _ in range(2))
    ot = torch.optim.Adam(a + a64, lr=LR, foreach=False)
    of = Adam(b + b64, lr=LR, max_grad_norm=0.2)
    for _ in range(50):
        for ps, ps64 in ((a, a64), (b, b64)):
            _backward("mlp", [ps], x, y)
            _backward("mlp", [ps64], x.double(), y.double())
        _clip_in_double(a + a64, 0.2)
        ot.step()
        of.step()
        mine = [p.grad for p in b + b64]  # fastadam's own gradients (not rewritten)
        exact = float(torch.stack([g.double().pow(2).sum() for g in mine]).sum().sqrt())
        assert of.last_grad_norm == pytest.approx(exact, rel=1e-14)
        assert of.last_grad_norm == pytest.approx(
            float(torch.nn.utils.get_total_norm(mine)), rel=1e-6
        )
    assert len(of._cache.plans) == 2
    assert _ratio(b, a, torch.float32, LR, 50) <= K_TRAJ
    # The float32 parameters drift by float32 ulps, so do their gradients and the global
    # norm, and through the clip coefficient the float64 parameters: float32's bound.
    assert _ratio(b64, a64, torch.float32, LR, 50) <= K_TRAJ


# ----------------------------------------------------------------------- examples
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script, choices",
    [("numpy_training.py", ("fastadam", "plain")), ("torch_training.py", ("fastadam", "torch"))],
)
def test_examples_run_and_switch(script, choices, capsys):
    """Both examples run with either optimizer. The NumPy one lands on the same accuracy
    both ways; the conv net (ReLU, max-pooling, early in training) is too sensitive for
    that: torch's float32 clip_grad_norm_ is already 3e-5 relative off fastadam's
    double-precision norm at step 1 (a 1M-element gradient), and the runs then drift."""
    path = EXAMPLES / script
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    main = runpy.run_path(str(path))["main"]
    args = ["--steps", "60"] if script.startswith("numpy") else ["--steps", "8", "--samples", "256"]
    accs = [main(["--optimizer", c] + args) for c in choices]
    assert all(0.0 <= a <= 1.0 for a in accs)
    if script.startswith("numpy"):
        assert accs[0] == pytest.approx(accs[1], abs=0.01)
    out = capsys.readouterr().out
    assert out.count("accuracy") == 2


if __name__ == "__main__":  # print the measured trajectory differences
    torch.set_num_threads(1)
    for (kind, dtype), (ratios, dmax) in measure_trajectories().items():
        print(
            f"{kind} {dtype}: max |dp| = {dmax:.3g}; |dp|/(t eps (|p|+lr)) per combination: "
            + " ".join(f"{r:.2f}" for r in ratios)
        )
