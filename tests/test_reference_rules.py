"""The NumPy specification of SGD, Adagrad, RMSprop, Adamax, NAdam, RAdam and Lion
(fastadam.reference) against torch.optim (foreach=False, CPU) over 300 closed-loop steps.

The reference does not promise torch's bits. Each rule's module lists its deliberate
differences: torch's CPU kernels compute ``add(x, alpha=a)``, ``addcmul`` and ``lerp`` as
fused multiply-adds where the reference rounds the product (the C kernels must give the
same bits on every SIMD path), NAdam multiplies by 1/(1 - beta2**t) where torch divides,
RAdam folds its four per-step scalars into one, and with torch's default dtype float32
torch keeps NAdam's mu_product in float32 where the reference keeps a double. So one step
may differ from torch's by an ulp or so of each rounded quantity.

The problem is a closed loop, as in training: the gradient is computed from the current
parameters, g = s * h * (p - c + xi_t) elementwise (a diagonal quadratic with a fixed
noise xi_t ~ N(0, 0.5**2), drawn in advance; s = -1 for the cases with maximize=True, which
ascend the negated loss, i.e. still descend), with curvatures h = 10**U(-8, 1) (so that eps
matters for some elements) and 5% exact zeros, |p_0| in [3, 5] and targets c 1 to 2 closer
to 0 (so that no L2 term moves the optimum near the start). Both sides compute g with the
same NumPy expression, so equal parameters give equal gradients. The step sizes keep every
element of the sign-like rules (all but SGD) at least ~0.3 from its optimum for 300 steps:
near an optimum a sign-like update amplifies a one-ulp difference (|du/dp| ~ lr/|p - c|)
and no ulp bound holds, as tests/test_torch_optim.py explains. SGD contracts (lr*h <= 0.1)
and runs to convergence. The noise keeps the gradient from being constant, which would make
centered RMSprop's v - a*a a catastrophic cancellation (see fastadam.reference.rmsprop).
A difference in p is then fed back through g but not amplified, and after t steps the two
trajectories are apart by at most about t rounding errors of one step. Elementwise, with
eps_T the dtype's epsilon and, over torch's trajectory, P = max |p|, U = max |p_k - p_(k-1)|
(the largest step the element took), G = max |g| and S = max |state|:

    |p_ref - p_torch| <= K_P * t * eps_T * (P + U)
          (P: the rounding of p; U: of the update. This is the Adam tests' (|p| + lr) with
           the step the element actually took, since SGD's step is lr*|u|, not ~lr)
    |s_ref - s_torch| <= K_S * t * eps_T * (S + G**k)
          for every state array s, with k = 1 for states linear in g (exp_avg, grad_avg,
          SGD's momentum_buffer, exp_inf) and k = 2 for squares (exp_avg_sq, square_avg,
          sum); K_B * t * eps_T * S for RMSprop's momentum_buffer (a sum of g/d, without
          units). The factor t, where the Adam tests' states have none, is the closed loop:
          p's drift (<= K_P t eps_T (P + U)) comes back as a gradient difference
          h * dp <~ G * dp / |p - c|, with |p - c| >~ 0.3 and P + U <~ 5 here.
    mu_product (NAdam), at every step: equal in float64 (torch's default dtype is set to
          the parameters' dtype, so torch keeps it in float64 and does the same double
          multiplications); in float32 torch rounds mu and the product to float32 at every
          step: |mu_ref - mu_torch| <= t * 2**-23 * mu_torch (while in float32's normal
          range; it is subnormal from step 111 with the default betas).

Measured (x86-64, torch 2.13 with AVX-512 kernels, NumPy 2.4) as the largest value over
all elements and cases of each rule of |dp| / (t eps_T (P + U)), float32 / float64:
    SGD 0.0048 / 0.0037, Adagrad 0.0032 / 0.0032, RMSprop 0.012 / 0.0095 (centered),
    Adamax 0.0031 / 0.0039, NAdam 0.0039 / 0.0042, RAdam 0.0040 / 0.0031,
    Lion 0 / 0 (bit-identical, see below);
of |ds| / (t eps_T (S + G**k)) over all states: 0.024 / 0.016 (RMSprop's square_avg);
of RMSprop's momentum_buffer |db| / (t eps_T S): 0.094 / 0.072; of NAdam's float32
mu_product: 0.18 of its bound. With five other seeds of the problem: at most 0.015 (p),
0.028 (states), 0.11 (RMSprop's momentum_buffer), 0.18 (mu_product).
In plain ulps that is a few ulps of p after 300 steps: far below one ulp per step, since
most roundings agree and the rest are as likely up as down.
K_P = 0.05, K_S = 0.1 and K_B = 0.4 leave a factor of ~4 over the worst case seen (3.3 to
3.7 over the other seeds) while staying at the rounding level: 1/20 of an ulp of drift per
step, 1.8e-6 * (P + U) after 300 float32 steps, 3.3e-15 * (P + U) in float64.

The bound catches wrong rules (test_bound_catches_a_wrong_rule, float64): the step count
off by one (SGD's undampened first step, Adagrad's lr decay, Adamax's and NAdam's bias
corrections and NAdam's mu schedule, RAdam's rectification), the dampening ignored,
centered RMSprop not centered, NAdam's momentum_decay doubled, Lion's betas swapped. Each
moves p by 5e-5 to 0.2 relative to P + U: 10**10 to 10**13 times the float64 bound (and
30 to 10**5 times the float32 one).

Lion is not in torch; it is compared with a straightforward torch implementation written
here in the style of lion-pytorch (lucidrains), with its interpolation written as separate
torch ops (``m * beta1 + g * (1 - beta1)``): lion-pytorch's ``add(g, alpha=1 - beta1)`` is
a fused multiply-add on torch's CPU, which can flip sign(c) where c is within an ulp of 0
and would make the test about that accident (a flipped sign moves p by 2 lr, far outside
any ulp bound). So written, every operation is the reference's (and an exactly rounded
IEEE operation on any platform) and the two agree bit for bit. Two of the Lion cases use
an lr that reaches the optimum, so that sign(c) keeps changing and depends on both betas.
"""

import contextlib
import functools
import math

import numpy as np
import pytest

import fastadam.reference as R

try:
    import torch
except ImportError:  # the torch tests skip (see _torch below)
    torch = None

SHAPES = [(7,), (3, 5), (2, 3, 4), (65,), (300,)]
STEPS = 300
K_P = 0.05
K_S = 0.1
K_B = 0.4  # RMSprop's momentum_buffer (no G term)
DTYPES = [np.float32, np.float64]

# name: (rule, lr, options). lr keeps the sign-like rules away from their optimum (see the
# module docstring); the defaults are torch's everywhere else.
CASES = {
    "sgd": ("SGD", 1e-2, {}),
    "sgd_momentum": ("SGD", 1e-2, dict(momentum=0.9)),
    "sgd_dampening": ("SGD", 1e-2, dict(momentum=0.9, dampening=0.5)),
    "sgd_nesterov_l2": ("SGD", 1e-2, dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_maximize_l2": ("SGD", 1e-2, dict(momentum=0.5, weight_decay=0.1, maximize=True)),
    "adagrad": ("Adagrad", 1e-2, {}),
    "adagrad_decay_init_l2": (
        "Adagrad",
        1e-2,
        dict(lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2),
    ),
    "adagrad_maximize": ("Adagrad", 1e-2, dict(eps=1e-6, maximize=True)),
    "rmsprop": ("RMSprop", 1e-3, {}),
    "rmsprop_momentum": ("RMSprop", 1e-4, dict(alpha=0.9, momentum=0.9)),
    "rmsprop_centered_l2": ("RMSprop", 1e-3, dict(centered=True, weight_decay=1e-2)),
    "rmsprop_all_maximize": (
        "RMSprop",
        1e-4,
        dict(eps=1e-6, centered=True, momentum=0.5, weight_decay=1e-3, maximize=True),
    ),
    "adamax": ("Adamax", 2e-3, {}),
    "adamax_l2_maximize": (
        "Adamax",
        2e-3,
        dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, maximize=True),
    ),
    "nadam": ("NAdam", 2e-3, {}),
    "nadam_l2": ("NAdam", 2e-3, dict(weight_decay=1e-2)),
    "nadam_decoupled_maximize": (
        "NAdam",
        2e-3,
        dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
    "nadam_schedule": ("NAdam", 2e-3, dict(betas=(0.8, 0.99), momentum_decay=1e-2, eps=1e-6)),
    "radam": ("RAdam", 1e-3, {}),
    "radam_l2": ("RAdam", 1e-3, dict(weight_decay=1e-2)),
    "radam_decoupled_maximize": (
        "RAdam",
        1e-3,
        dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True),
    ),
    "radam_betas": ("RAdam", 1e-3, dict(betas=(0.8, 0.99), eps=1e-6)),
    "lion": ("Lion", 1e-3, {}),
    # Lion at an lr that reaches the optimum (and then oscillates around it, so that
    # sign(c) depends on both betas): bit-identical to torch, so no chaos to avoid.
    "lion_optimum": ("Lion", 5e-2, dict(betas=(0.95, 0.98))),
    "lion_decay_maximize": ("Lion", 5e-2, dict(weight_decay=0.1, maximize=True)),
}

# The states of each rule, by torch's state-dict name, and the power of G in their bound
# (None: no G term).
STATES = {
    "SGD": {"momentum_buffer": 1},
    "Adagrad": {"sum": 2},
    "RMSprop": {"square_avg": 2, "momentum_buffer": None, "grad_avg": 1},
    "Adamax": {"exp_avg": 1, "exp_inf": 1},
    "NAdam": {"exp_avg": 1, "exp_avg_sq": 2},
    "RAdam": {"exp_avg": 1, "exp_avg_sq": 2},
    "Lion": {"exp_avg": 1},
}


# ------------------------------------------------------------------ the closed-loop problem
@functools.cache
def _problem(dtype, seed=0):
    """Initial parameters, curvatures h and targets c (read-only arrays of dtype)."""
    rng = np.random.default_rng(seed)
    sign = [rng.choice([-1.0, 1.0], s) for s in SHAPES]
    p0 = [sg * rng.uniform(3, 5, sg.shape) for sg in sign]
    h = [10.0 ** rng.uniform(-8, 1, s) * (rng.random(s) >= 0.05) for s in SHAPES]
    c = [p - sg * rng.uniform(1, 2, sg.shape) for p, sg in zip(p0, sign)]
    out = tuple([a.astype(dtype) for a in x] for x in (p0, h, c))
    noise = [[(0.5 * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    for a in [a for x in out for a in x] + [a for x in noise for a in x]:
        a.setflags(write=False)
    return out + (noise,)


def _grad(p, h, c, noise, sign):
    """The gradient of sign * 0.5 * sum(h (p - c + noise)**2) in p's dtype (both sides use
    this expression)."""
    return (h * sign) * ((p - c) + noise)


# ------------------------------------------------------------------ the reference side
def _ref_init(rule, p, options):
    z = np.zeros_like
    if rule == "SGD":
        return {"momentum_buffer": z(p)} if options.get("momentum", 0) != 0 else {}
    if rule == "Adagrad":
        return {"sum": np.full_like(p, options.get("initial_accumulator_value", 0.0))}
    if rule == "RMSprop":
        st = {"square_avg": z(p)}
        if options.get("momentum", 0) > 0:
            st["momentum_buffer"] = z(p)
        if options.get("centered", False):
            st["grad_avg"] = z(p)
        return st
    if rule == "Adamax":
        return {"exp_avg": z(p), "exp_inf": z(p)}
    if rule == "NAdam":
        return {"exp_avg": z(p), "exp_avg_sq": z(p), "mu_product": 1.0}
    if rule in ("RAdam",):
        return {"exp_avg": z(p), "exp_avg_sq": z(p)}
    if rule == "Lion":
        return {"exp_avg": z(p)}
    raise AssertionError(rule)


def _ref_step(rule, p, g, st, t, lr, options):
    kw = dict(options, step=t, lr=lr)
    if rule == "SGD":
        R.sgd_step(p, g, st.get("momentum_buffer"), **kw)
    elif rule == "Adagrad":
        kw.pop("initial_accumulator_value", None)  # state initialisation, not a step option
        R.adagrad_step(p, g, st["sum"], **kw)
    elif rule == "RMSprop":
        R.rmsprop_step(p, g, st["square_avg"], st.get("momentum_buffer"), st.get("grad_avg"), **kw)
    elif rule == "Adamax":
        R.adamax_step(p, g, st["exp_avg"], st["exp_inf"], **kw)
    elif rule == "NAdam":
        st["mu_product"] = R.nadam_step(
            p, g, st["exp_avg"], st["exp_avg_sq"], mu_product=st["mu_product"], **kw
        )
    elif rule == "RAdam":
        R.radam_step(p, g, st["exp_avg"], st["exp_avg_sq"], **kw)
    elif rule == "Lion":
        R.lion_step(p, g, st["exp_avg"], **kw)
    else:
        raise AssertionError(rule)


# ------------------------------------------------------------------ the torch side
class _TorchLion:
    """Lion in torch, as lion-pytorch (lucidrains) writes it, with the interpolation as
    separate ops (see the module docstring); a minimal torch.optim-like interface."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        self.params, self.lr, self.betas = params, lr, betas
        self.weight_decay, self.maximize = weight_decay, maximize
        self.state = {p: {"exp_avg": torch.zeros_like(p)} for p in params}

    def step(self):
        beta1, beta2 = self.betas
        with torch.no_grad():
            for p in self.params:
                grad = -p.grad if self.maximize else p.grad
                exp_avg = self.state[p]["exp_avg"]
                p.mul_(1.0 - self.lr * self.weight_decay)
                update = (exp_avg * beta1 + grad * (1.0 - beta1)).sign_()
                p.add_(update, alpha=-self.lr)
                exp_avg.mul_(beta2).add_(grad * (1.0 - beta2))


@contextlib.contextmanager
def _default_dtype(dtype):
    """torch's default dtype = the parameters' (NAdam keeps mu_product in it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _run(dtype, name, ref_options=None, torch_side=True):
    """Run the reference and (unless torch_side is False) torch side by side.

    ref_options: options for the reference that replace the case's (a deliberately wrong
    rule); a key "step_offset" adds to the step count the reference is given.
    Returns a dict with the final parameters and states of both sides and, over torch's
    trajectory, P, U, G and the state maxima S (lists, one array per parameter).
    """
    rule, lr, options = CASES[name]
    ropts = dict(options if ref_options is None else ref_options)
    offset = ropts.pop("step_offset", 0)
    p0, h, c, noise = _problem(dtype)
    sign = -1.0 if options.get("maximize", False) else 1.0
    n = len(SHAPES)
    rp = [a.copy() for a in p0]
    rst = [_ref_init(rule, p, ropts) for p in rp]
    out = {"ref_p": rp, "ref_state": rst}

    def ref_step(t, i):
        g = _grad(rp[i], h[i], c[i], noise[t - 1][i], sign)
        _ref_step(rule, rp[i], g, rst[i], t + offset, lr, ropts)

    if not torch_side:
        for t in range(1, STEPS + 1):
            for i in range(n):
                ref_step(t, i)
        return out
    with _default_dtype(dtype):
        tp = [torch.tensor(a) for a in p0]  # copies
        if rule == "Lion":
            opt = _TorchLion(tp, lr=lr, **options)
        else:
            opt = getattr(torch.optim, rule)(tp, lr=lr, foreach=False, **options)
        P = [np.abs(a.astype(np.float64)) for a in p0]
        U = [np.zeros(s) for s in SHAPES]
        G = [np.zeros(s) for s in SHAPES]
        S = [{k: np.zeros(s) for k in STATES[rule]} for s in SHAPES]
        mu_ratio = 0.0
        for t in range(1, STEPS + 1):
            before = [a.detach().numpy().astype(np.float64) for a in tp]
            for i in range(n):
                ref_step(t, i)
                g = _grad(tp[i].detach().numpy(), h[i], c[i], noise[t - 1][i], sign)
                G[i] = np.maximum(G[i], np.abs(g.astype(np.float64)))
                tp[i].grad = torch.from_numpy(g)
            opt.step()
            for i in range(n):
                if rule == "NAdam":  # compared at every step (it underflows to 0 by the end)
                    mu_ref, mu_t = rst[i]["mu_product"], float(opt.state[tp[i]]["mu_product"])
                    if dtype == np.float64:
                        mu_ratio = max(mu_ratio, 0.0 if mu_ref == mu_t else math.inf)
                    elif mu_t >= 2.0**-126:  # float32's normal range
                        mu_ratio = max(mu_ratio, abs(mu_ref - mu_t) / (t * 2.0**-23 * mu_t))
                now = tp[i].detach().numpy().astype(np.float64)
                P[i] = np.maximum(P[i], np.abs(now))
                U[i] = np.maximum(U[i], np.abs(now - before[i]))
                for k, m in S[i].items():
                    if k in opt.state[tp[i]]:
                        np.maximum(m, np.abs(opt.state[tp[i]][k].numpy()), out=m)
    out.update(
        torch_p=[a.detach().numpy() for a in tp],
        torch_state=[opt.state[a] for a in tp],
        P=P,
        U=U,
        G=G,
        S=S,
        mu_ratio=mu_ratio,
    )
    return out


@functools.cache
def _result(dtype, name):
    return _run(dtype, name)


# ------------------------------------------------------------------ the bounds
def _ratios(dtype, name, r, ref=None):
    """{array name: max over elements of |ref - torch| / bound} for p, each state and
    mu_product (the module docstring's bounds with K = 1, so that a ratio <= K passes).
    ref: (params, states) of another reference run (a wrong rule), else r's own."""
    rule = CASES[name][0]
    rp, rst = (r["ref_p"], r["ref_state"]) if ref is None else ref
    e = float(np.finfo(dtype).eps)
    out = {}

    def put(key, diff, bound):
        diff = np.abs(np.asarray(diff, dtype=np.float64))
        if not np.all(np.isfinite(diff)):
            out[key] = math.inf
            return
        assert np.all(bound > 0)
        out[key] = max(out.get(key, 0.0), float(np.max(diff / bound, initial=0.0)))

    for i in range(len(SHAPES)):
        put("p", rp[i].astype(np.float64) - r["torch_p"][i], STEPS * e * (r["P"][i] + r["U"][i]))
        for k, power in STATES[rule].items():
            if k not in r["torch_state"][i] or k not in rst[i]:
                continue
            want = r["torch_state"][i][k].numpy()
            assert want.dtype == dtype
            scale = r["S"][i][k] + (0.0 if power is None else r["G"][i] ** power)
            # Zero only where the state stayed zero throughout (h = 0 and no decay).
            put(k, rst[i][k].astype(np.float64) - want, STEPS * e * np.maximum(scale, 1e-300))
    if rule == "NAdam" and ref is None:
        out["mu_product"] = r["mu_ratio"]
    return out


def measure():
    """{(rule, dtype name): {array: worst ratio over the rule's cases}} (for the docstring)."""
    worst = {}
    for dtype in DTYPES:
        for name, (rule, _, _) in CASES.items():
            w = worst.setdefault((rule, np.dtype(dtype).name), {})
            for k, v in _ratios(dtype, name, _result(dtype, name)).items():
                w[k] = max(w.get(k, 0.0), v)
    return worst


# ------------------------------------------------------------------ tests against torch
@pytest.fixture(scope="module")
def _torch():
    """Skip without torch; one torch thread (small tensors: threads only add contention)."""
    t = pytest.importorskip(
        "torch",
        reason="torch is not installed: the reference rules are not compared with torch.optim",
    )
    n = t.get_num_threads()
    t.set_num_threads(1)
    yield t
    t.set_num_threads(n)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_matches_torch(_torch, dtype, name):
    r = _result(dtype, name)
    for k, ratio in _ratios(dtype, name, r).items():
        bound = {"p": K_P, "mu_product": 1.0}.get(k, K_S)
        if STATES[CASES[name][0]].get(k, 0) is None:
            bound = K_B
        assert ratio <= bound, (
            f"{name} ({np.dtype(dtype).name}): {k} differs from torch's "
            f"by {ratio:.3g} * t * eps * scale; bound {bound}"
        )
    for a in r["ref_p"]:
        assert a.dtype == dtype and np.all(np.isfinite(a))
    # Not vacuous: the parameters moved far more than the tolerance allows.
    p0 = _problem(dtype)[0]
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(r["ref_p"], p0))
    assert moved > 1e3 * K_P * STEPS * np.finfo(dtype).eps * 5, moved


def test_radam_takes_both_branches():
    """With beta2 = 0.999 steps 1-5 are un-rectified and 6-300 rectified (torch's rho_t
    test on the same double): the 300-step comparison covers both kernels."""
    rect = [R.radam_constants(t).rectified for t in range(1, STEPS + 1)]
    assert rect[:5] == [False] * 5 and all(rect[5:])
    rect = [R.radam_constants(t, betas=(0.8, 0.99)).rectified for t in range(1, STEPS + 1)]
    assert not all(rect) and any(rect)


def test_lion_is_bit_identical(_torch):
    """Lion: every operation of the torch version is one of the reference's (see above)."""
    for dtype in DTYPES:
        for name in ("lion", "lion_optimum", "lion_decay_maximize"):
            r = _result(dtype, name)
            for a, b in zip(r["ref_p"], r["torch_p"]):
                assert np.array_equal(a, b)


# name, case, the reference's (wrong) options: each must break the bound in float64.
WRONG = [
    ("step off by one", "sgd_dampening", dict(momentum=0.9, dampening=0.5, step_offset=1)),
    ("dampening ignored", "sgd_dampening", dict(momentum=0.9)),
    (
        "step off by one",
        "adagrad_decay_init_l2",
        dict(lr_decay=1e-2, initial_accumulator_value=0.1, weight_decay=1e-2, step_offset=1),
    ),
    ("not centered", "rmsprop_centered_l2", dict(weight_decay=1e-2)),
    ("step off by one", "adamax", dict(step_offset=1)),
    ("step off by one", "nadam", dict(step_offset=1)),
    ("momentum_decay doubled", "nadam", dict(momentum_decay=8e-3)),
    ("step off by one", "radam", dict(step_offset=1)),
    ("betas swapped", "lion_optimum", dict(betas=(0.98, 0.95))),
]


@pytest.mark.parametrize("what, name, wrong", WRONG, ids=[f"{n}-{w}" for w, n, _ in WRONG])
def test_bound_catches_a_wrong_rule(_torch, what, name, wrong):
    r = _result(np.float64, name)
    bad = _run(np.float64, name, ref_options=wrong, torch_side=False)
    ratios = _ratios(np.float64, name, r, ref=(bad["ref_p"], bad["ref_state"]))
    assert ratios["p"] > 1e6 * K_P, f"{what}: only {ratios['p'] / K_P:.3g} times the bound"


# ------------------------------------------------------------------ without torch
def _arrays(rule, n=37, dtype=np.float32, seed=1, options=None):
    """Random param and grad, and the rule's state arrays as before step 1."""
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    st = {k: np.zeros(n, dtype) for k in STATES[rule]}
    if rule == "NAdam":
        st["mu_product"] = 1.0
    return p, g, st


def _call(rule, p, g, st, **kw):
    """One reference step of `rule` on (p, g, st) (st updated in place, mu_product too)."""
    kw.setdefault("step", 3)
    kw.setdefault("lr", CASES[rule.lower()][1])
    _ref_step(rule, p, g, st, kw.pop("step"), kw.pop("lr"), kw)


RULE_OPTIONS = {  # options that switch on every variant of each rule
    "SGD": dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "Adagrad": dict(lr_decay=1e-2, weight_decay=1e-2),
    "RMSprop": dict(momentum=0.9, centered=True, weight_decay=1e-2),
    "Adamax": dict(weight_decay=1e-2),
    "NAdam": dict(weight_decay=1e-2),
    "RAdam": dict(weight_decay=1e-2, decoupled_weight_decay=True),
    "Lion": dict(weight_decay=1e-2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rule", list(STATES))
def test_grad_scale_and_maximize_fold_exactly(rule, dtype):
    """grad_scale (a power of two) and maximize only change the first multiplication:
    grad*8 with grad_scale=8, and -grad with maximize=True, give the same bits."""
    results = []
    for scale, sign, maximize in ((1.0, 1.0, False), (8.0, 1.0, False), (1.0, -1.0, True)):
        p, g, st = _arrays(rule, dtype=dtype)
        for t in (1, 2, 7):  # RAdam: un-rectified, then rectified
            _call(
                rule,
                p,
                (g * dtype(scale * sign)).astype(dtype),
                st,
                step=t,
                grad_scale=scale,
                maximize=maximize,
                **RULE_OPTIONS[rule],
            )
        assert p.dtype == dtype and all(getattr(a, "dtype", dtype) == dtype for a in st.values())
        results.append((p, st))
    for p, st in results[1:]:
        assert np.array_equal(p, results[0][0]) and np.all(np.isfinite(p))
        for k, a in st.items():
            assert np.array_equal(a, results[0][1][k]), k


BAD = [  # rule, options, exception, message
    ("SGD", dict(lr=-1.0), ValueError, "lr"),
    ("SGD", dict(lr=float("nan")), ValueError, "lr"),
    ("SGD", dict(momentum=-0.1), ValueError, "momentum"),
    ("SGD", dict(dampening=float("inf")), ValueError, "dampening"),
    ("SGD", dict(nesterov=True), ValueError, "nesterov"),
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    ("SGD", dict(nesterov="yes"), TypeError, "nesterov"),
    ("SGD", dict(weight_decay="0"), TypeError, "weight_decay"),
    ("Adagrad", dict(lr_decay=-1e-3), ValueError, "lr_decay"),
    ("Adagrad", dict(eps=-1.0), ValueError, "eps"),
    ("Adagrad", dict(step=0), ValueError, "step"),
    ("Adagrad", dict(step=2.0), TypeError, "step"),
    ("RMSprop", dict(alpha=-0.5), ValueError, "alpha"),
    ("RMSprop", dict(momentum=float("nan")), ValueError, "momentum"),
    ("RMSprop", dict(centered=None), TypeError, "centered"),
    ("Adamax", dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    ("Adamax", dict(betas=0.9), TypeError, "betas"),
    ("NAdam", dict(momentum_decay=-1e-3), ValueError, "momentum_decay"),
    ("NAdam", dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
    ("NAdam", dict(decoupled_weight_decay=1.5), TypeError, "decoupled_weight_decay"),
    ("NAdam", dict(mu_product=1.5), ValueError, "mu_product"),
    ("NAdam", dict(mu_product="1"), TypeError, "mu_product"),
    ("RAdam", dict(eps=float("inf")), ValueError, "eps"),
    ("RAdam", dict(grad_scale=0.0), ValueError, "grad_scale"),
    ("RAdam", dict(maximize="no"), TypeError, "maximize"),
    ("Lion", dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    ("Lion", dict(weight_decay=-1.0), ValueError, "weight_decay"),
]


@pytest.mark.parametrize("rule, kw, exc, match", BAD)
def test_bad_hyperparameters(rule, kw, exc, match):
    """TypeError/ValueError naming the argument, nothing changed."""
    p, g, st = _arrays(rule)
    if "mu_product" in kw:
        st["mu_product"] = kw.pop("mu_product")
    before = [p.copy()] + [np.copy(a) for a in st.values()]
    with pytest.raises(exc, match=match):
        _call(rule, p, g, st, **kw)
    for a, b in zip([p] + list(st.values()), before):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("rule", list(STATES))
def test_bad_arrays(rule):
    opts = RULE_OPTIONS[rule]
    p, g, st = _arrays(rule)
    with pytest.raises(TypeError, match="param must have dtype"):
        _call(
            rule,
            p.astype(np.float16),
            g.astype(np.float16),
            {k: (a.astype(np.float16) if isinstance(a, np.ndarray) else a) for k, a in st.items()},
            **opts,
        )
    with pytest.raises(TypeError, match=r"param must be a numpy\.ndarray"):
        _call(rule, list(p), g, st, **opts)
    with pytest.raises(ValueError, match="grad must match"):
        _call(rule, p, g[:-1], st, **opts)
    with pytest.raises(ValueError, match="grad must match"):
        _call(rule, p, g.astype(np.float64), st, **opts)
    k = next(iter(STATES[rule]))
    with pytest.raises(ValueError, match=f"{k if k != 'sum' else 'state_sum'} must match"):
        _call(rule, p, g, dict(st, **{k: st[k][:-1]}), **opts)
    ro = p.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="param must be writeable"):
        _call(rule, ro, g, st, **opts)


def test_missing_optional_states():
    p, g, _ = _arrays("SGD")
    with pytest.raises(ValueError, match="momentum_buffer is required"):
        R.sgd_step(p, g, None, step=1, momentum=0.9)
    R.sgd_step(p, g, None, step=1)  # no momentum: no buffer needed
    with pytest.raises(ValueError, match="grad_avg is required"):
        R.rmsprop_step(p, g, np.zeros_like(p), step=1, centered=True)
    with pytest.raises(ValueError, match="momentum_buffer is required"):
        R.rmsprop_step(p, g, np.zeros_like(p), step=1, momentum=0.5)
    with pytest.raises(TypeError, match="mu_product"):
        R.nadam_step(p, g, np.zeros_like(p), np.zeros_like(p), step=1)  # required


def test_sgd_first_step_is_undampened():
    """torch's first momentum step copies g into the buffer (no dampening); later steps
    dampen. With the zero buffer the kernels use, step=1 selects that variant."""
    p, g, _ = _arrays("SGD")
    b = np.zeros_like(p)
    p1 = p.copy()
    R.sgd_step(p1, g, b, step=1, lr=0.1, momentum=0.9, dampening=0.5)
    assert np.array_equal(b, g)
    assert np.array_equal(p1, p - np.float32(0.1) * g)
    R.sgd_step(p1, g, b, step=2, lr=0.1, momentum=0.9, dampening=0.5)
    assert np.array_equal(b, g * np.float32(0.9) + np.float32(0.5) * g)
    assert R.sgd_constants(1, momentum=0.9).first and not R.sgd_constants(2, momentum=0.9).first
    assert not R.sgd_constants(1).first  # no momentum, no buffer


def test_nadam_mu_product_chain():
    """nadam_step returns mu_product * mu_t (double), the constants' mu_product field."""
    p, g, _ = _arrays("NAdam", dtype=np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    mu_product = 1.0
    for t in range(1, 5):
        c = R.nadam_constants(t, mu_product=mu_product)
        assert c.mu == 0.9 * (1.0 - 0.5 * 0.96 ** (t * 4e-3))
        assert c.mu_next == 0.9 * (1.0 - 0.5 * 0.96 ** ((t + 1) * 4e-3))
        new = R.nadam_step(p, g, m, v, step=t, mu_product=mu_product)
        assert new == c.mu_product == mu_product * c.mu
        mu_product = new


def test_non_finite_semantics():
    """Adamax's max is a select (a NaN gradient reaches exp_inf, a NaN already there is
    replaced); Lion's sign propagates NaN (torch.sign(nan) is 0 on the CPU), keeps the sign
    of a zero, and gives +-1 for +-inf."""
    nan, inf = float("nan"), float("inf")
    p = np.array([1.0, 1.0, 1.0], np.float32)
    m, u = np.zeros_like(p), np.zeros_like(p)
    R.adamax_step(p, np.array([nan, 1.0, inf], np.float32), m, u, step=1)
    assert np.isnan(u[0]) and u[1] > 0 and u[2] == inf
    assert np.isnan(p[0]) and np.isfinite(p[1]) and np.isnan(p[2])  # inf/inf
    R.adamax_step(p, np.array([1.0, 1.0, 1.0], np.float32), m, u, step=2)
    assert np.isfinite(u[0]) and np.isnan(m[0]) and np.isnan(p[0])
    p = np.array([1.0, 1.0, 1.0, 1.0, -0.0], np.float32)
    m = np.zeros_like(p)
    R.lion_step(p, np.array([nan, 0.0, inf, -inf, -0.0], np.float32), m, step=1, lr=0.5)
    assert np.isnan(p[0]) and np.isnan(m[0])
    assert p[1] == 1.0 and p[2] == 0.5 and p[3] == 1.5
    assert p[4] == 0.0  # sign(0) = 0: a zero interpolation leaves p where it is


def test_constants_are_plain_doubles_and_bools():
    """The NamedTuples hold Python floats and bools only (transcribed into C structs)."""
    for c in (
        R.sgd_constants(2, momentum=0.9, nesterov=True),
        R.adagrad_constants(2),
        R.rmsprop_constants(2, centered=True, momentum=0.1),
        R.adamax_constants(2),
        R.nadam_constants(2, mu_product=0.5),
        R.radam_constants(9),
        R.lion_constants(2),
    ):
        for field, value in c._asdict().items():
            assert type(value) in (float, bool), (type(c).__name__, field, type(value))
