"""Every update rule of the engine against its NumPy specification, bit for bit.

For each rule and a set of option combinations that covers every kernel variant, the
NumPy optimizer (one fused C call per step over several tensors of odd sizes) must equal
``fastadam.reference.<rule>_step`` applied to each tensor alone -- ``numpy.array_equal``
on the parameters and on every state buffer -- on every SIMD path usable here, for 1 to
3 threads with a small chunk (so that blocks are cut between threads), with software
prefetching forced on and automatic, in float32 and float64. The temporal average
(``ema_decay``) must equal ``reference.ema_update`` after each step, and never change
the trajectory. Plus: state_dict round trips, refused bad input for every new
hyperparameter, and the options every optimizer shares (clipping, loss scaling,
skip_nonfinite, schedules) for every rule.
"""

import copy
import math

import numpy as np
import pytest

import fastadam
from fastadam import _core, reference

# (class, constructor options, the reference function, its state arrays' names in order)
RULES = {
    "adam": (fastadam.Adam, reference.adam_step, ("exp_avg", "exp_avg_sq")),
    "sgd": (fastadam.SGD, reference.sgd_step, ("momentum_buffer",)),
    "adagrad": (fastadam.Adagrad, reference.adagrad_step, ("sum",)),
    "rmsprop": (
        fastadam.RMSprop,
        reference.rmsprop_step,
        ("square_avg", "momentum_buffer", "grad_avg"),
    ),
    "adamax": (fastadam.Adamax, reference.adamax_step, ("exp_avg", "exp_inf")),
    "nadam": (fastadam.NAdam, reference.nadam_step, ("exp_avg", "exp_avg_sq")),
    "radam": (fastadam.RAdam, reference.radam_step, ("exp_avg", "exp_avg_sq")),
    "lion": (fastadam.Lion, reference.lion_step, ("exp_avg",)),
}

# Option sets: together they switch every variant bit of every rule on and off.
CASES = [
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, eps_root=1e-6, weight_decay=0.1, maximize=True)),
    (
        "adam",
        dict(
            lr=0.01,
            eps_root=1e-3,
            eps_mode="hat",
            amsgrad=True,
            decoupled_weight_decay=True,
            weight_decay=0.1,
        ),
    ),
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.05, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("adagrad", dict()),
    (
        "adagrad",
        dict(
            lr=0.1,
            lr_decay=0.05,
            weight_decay=0.1,
            initial_accumulator_value=0.5,
            eps=1e-6,
            maximize=True,
        ),
    ),
    ("rmsprop", dict()),
    ("rmsprop", dict(alpha=0.9, weight_decay=0.1, momentum=0.5)),
    ("rmsprop", dict(alpha=0.9, centered=True)),
    ("rmsprop", dict(alpha=0.95, centered=True, momentum=0.9, weight_decay=0.01, maximize=True)),
    ("adamax", dict()),
    ("adamax", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.1, maximize=True)),
    ("nadam", dict()),
    ("nadam", dict(weight_decay=0.1, momentum_decay=0.01)),
    ("nadam", dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("radam", dict()),
    ("radam", dict(weight_decay=0.1, betas=(0.8, 0.9))),
    ("radam", dict(weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("lion", dict()),
    ("lion", dict(lr=0.01, betas=(0.5, 0.9), weight_decay=0.5, maximize=True)),
]
CASE_IDS = [f"{r}-{i}" for i, (r, _) in enumerate(CASES)]
SIZES = [1, 17, 0, 1153, 4099, 5]  # odd sizes, an empty one, one past the prefetch loop
STEPS = 8  # RAdam's rectification starts at step 6 with beta2 0.999


def _ref_kwargs(rule, kw):
    kw = dict(kw)
    if rule == "adagrad":
        kw.pop("initial_accumulator_value", None)
    return kw


def _ref_state(rule, kw, p):
    """The reference's state arrays for p (None where the options need none)."""
    names = RULES[rule][2]
    out = []
    for k in names:
        if rule == "sgd" and not kw.get("momentum"):
            out.append(None)
        elif rule == "rmsprop" and k == "momentum_buffer" and not kw.get("momentum"):
            out.append(None)
        elif rule == "rmsprop" and k == "grad_avg" and not kw.get("centered"):
            out.append(None)
        elif rule == "adagrad":
            out.append(np.full_like(p, kw.get("initial_accumulator_value", 0.0)))
        else:
            out.append(np.zeros_like(p))
    if rule == "adam" and kw.get("amsgrad"):
        out.append(np.zeros_like(p))
    return out


def _ref_step(rule, p, g, state, t, kw, scalar):
    fn = RULES[rule][1]
    kw = _ref_kwargs(rule, kw)
    if rule == "adam":
        vmax = state[2] if len(state) > 2 else None
        fn(p, g, state[0], state[1], step=t, max_exp_avg_sq=vmax, **kw)
        return scalar
    if rule == "nadam":
        return fn(p, g, *state, step=t, mu_product=scalar, **kw)
    if rule == "rmsprop":
        fn(p, g, state[0], state[1], state[2], step=t, **kw)
    elif rule == "sgd":
        fn(p, g, state[0], step=t, **kw)
    else:
        fn(p, g, *state, step=t, **kw)
    return scalar


def _data(dtype, seed=7):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    grads = [[rng.standard_normal(n).astype(dtype) for n in SIZES] for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("rule, kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_rule_equals_reference_on_every_path_and_thread_count(isa, rule, kw, dtype):
    cls = RULES[rule][0]
    params0, grads = _data(dtype)
    # the reference, one tensor at a time
    ref = [p.copy() for p in params0]
    ref_state = [_ref_state(rule, kw, p) for p in ref]
    ref_ema = [np.zeros_like(p) for p in ref]
    scalars = [1.0] * len(ref)
    for t, gs in enumerate(grads, 1):
        for i, (p, g) in enumerate(zip(ref, gs)):
            scalars[i] = _ref_step(rule, p, g, ref_state[i], t, kw, scalars[i])
            reference.ema_update(ref_ema[i], p, 0.9)
    for threads, prefetch in ((1, -1), (2, 1), (3, -1)):
        params = [p.copy() for p in params0]
        opt = cls(params, num_threads=threads, ema_decay=0.9, **kw)
        opt._isa, opt._chunk, opt._prefetch = isa, 64, prefetch
        for gs in grads:
            assert opt.step(gs) is True
        for i, (p, r) in enumerate(zip(params, ref)):
            assert np.array_equal(p, r, equal_nan=True), (rule, kw, threads, i)
            st = opt.state[i]
            names = [k for k in RULES[rule][2] if st.get(k) is not None]
            refs = [a for a in ref_state[i][: len(RULES[rule][2])] if a is not None]
            for k, a in zip(names, refs):
                assert np.array_equal(st[k], a), (rule, kw, threads, i, k)
            if rule == "adam" and kw.get("amsgrad"):
                assert np.array_equal(st["max_exp_avg_sq"], ref_state[i][2])
            if rule == "nadam":
                assert st["mu_product"] == scalars[i]
            assert np.array_equal(st["param_ema"], ref_ema[i])
            assert st["param_ema_step"] == STEPS


@pytest.mark.parametrize("rule", list(RULES))
def test_ema_never_changes_the_trajectory(rule):
    cls = RULES[rule][0]
    params0, grads = _data(np.float32, seed=11)
    a = [p.copy() for p in params0]
    b = [p.copy() for p in params0]
    opt_a, opt_b = cls(a), cls(b, ema_decay=0.99)
    for gs in grads:
        opt_a.step(gs)
        opt_b.step(gs)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    # the bias-corrected average: ema / (1 - d**t), new arrays
    avg = opt_b.averaged_params()
    ema = [s["param_ema"] for s in opt_b.state]
    for x, e, p in zip(avg, ema, b):
        assert x is not e and x.dtype == p.dtype
        assert np.array_equal(x, e / np.float32(1 - 0.99**STEPS))
    with pytest.raises(ValueError, match="ema_decay"):
        opt_a.averaged_params()


def test_averaged_params_is_the_papers_bias_corrected_average():
    """For a parameter that takes the values x_1..x_t, the bias-corrected EMA is the
    weighted mean sum d^(t-i) (1-d) x_i / (1 - d^t): with a constant gradient and SGD,
    x_i = x_0 - i*lr*g exactly in float64."""
    p = np.zeros(3)
    d, lr, t = 0.5, 0.25, 6
    opt = fastadam.SGD([p], lr=lr, ema_decay=d)
    for _ in range(t):
        opt.step([np.ones(3)])
    xs = [-lr * i for i in range(1, t + 1)]
    want = sum(d ** (t - i) * (1 - d) * x for i, x in zip(range(1, t + 1), xs)) / (1 - d**t)
    assert np.allclose(opt.averaged_params()[0], want, rtol=1e-15, atol=0)
    # not stepped yet: a copy of the parameter
    q = np.ones(2)
    assert np.array_equal(fastadam.SGD([q], ema_decay=d).averaged_params()[0], q)


def test_eps_root_zero_is_bitwise_the_plain_update(rng):
    p0 = rng.standard_normal(1000).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    oa, ob = fastadam.Adam([a], lr=0.01), fastadam.Adam([b], lr=0.01, eps_root=0.0)
    for _ in range(5):
        g = rng.standard_normal(1000).astype(np.float32)
        oa.step([g])
        ob.step([g])
    assert np.array_equal(a, b)
    c = p0.copy()
    oc = fastadam.Adam([c], lr=0.01, eps_root=1e-2)
    oc.step([g])
    assert not np.array_equal(c[:10], p0[:10])


def test_c_constants_equal_the_references():
    """The per-step constants the C core computes (in double, once per block) equal the
    reference's NamedTuple field for field: C's v[0] is grad_mul, v[1:3] the average's,
    v[3:] the rule's float fields in the reference's order."""
    cases = [
        ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01), ()),
        ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-9), ()),
        (
            "rmsprop",
            dict(lr=0.1, alpha=0.9, eps=1e-7, weight_decay=0.1, momentum=0.3, centered=True),
            (),
        ),
        ("adamax", dict(lr=0.1, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1), ()),
        (
            "nadam",
            dict(
                lr=0.1,
                betas=(0.8, 0.95),
                eps=1e-7,
                weight_decay=0.1,
                momentum_decay=0.01,
                decoupled_weight_decay=True,
            ),
            ("mu_product",),
        ),
        ("radam", dict(lr=0.1, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1), ()),
        ("lion", dict(lr=0.1, betas=(0.8, 0.95), weight_decay=0.1), ()),
    ]
    from fastadam._rules import RULES as SPECS

    for name, kw, extra in cases:
        spec = SPECS[name]
        o = spec.check(dict(spec.defaults, **kw))
        for t in (1, 2, 5, 6, 7, 100, 12345):
            scalar = 0.7 if extra else 1.0
            rkw = dict(kw, mu_product=scalar) if extra else kw
            r = getattr(reference, f"{name}_constants")(t, **rkw)
            c, _variant = _core.rule_consts(
                spec.index, o["lr"], o["weight_decay"], False, None, spec.c_hyper(o), t, scalar
            )
            floats = [v for v in r if type(v) is float]
            assert c[0] == r.grad_mul, (name, t)
            assert c[3 : 3 + len(floats) - 1] == floats[1:], (name, t)
            if extra:
                after = _core.scalar_after(
                    spec.index, o["lr"], o["weight_decay"], spec.c_hyper(o), t, scalar
                )
                assert after == r.mu_product


@pytest.mark.parametrize(
    "rule, kw",
    [c for c in CASES if c[0] != "adam"],
    ids=[i for i, c in zip(CASE_IDS, CASES) if c[0] != "adam"],
)
def test_state_dict_round_trip_continues_bit_for_bit(rule, kw):
    cls = RULES[rule][0]
    params0, grads = _data(np.float64, seed=5)
    a = [p.copy() for p in params0]
    opt = cls(a, ema_decay=0.5, **kw)
    for gs in grads[:4]:
        opt.step(gs)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.copy() for p in a]
    for gs in grads[4:]:
        opt.step(gs)
    b = [p.copy() for p in saved]
    opt2 = cls(b, ema_decay=0.5, **kw)
    opt2.load_state_dict(sd)
    for gs in grads[4:]:
        opt2.step(gs)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    keys = set(opt.state_dict()["state"][0])
    want = set(k for k in RULES[rule][2] if k in opt.state[0]) | {"param_ema", "param_ema_step"}
    if rule not in ("sgd", "lion"):
        want.add("step")
    if rule == "nadam":
        want.add("mu_product")
    assert keys == want
    assert opt2.state_dict()["step_count"] == STEPS


def test_sgd_first_step_copies_the_gradient_as_torch():
    """torch's SGD starts its momentum buffer at the first gradient, undampened; a
    buffer loaded from a state dict continues (dampened)."""
    p = np.zeros(4)
    opt = fastadam.SGD([p], lr=1.0, momentum=0.5, dampening=0.5)
    opt.step([np.full(4, 2.0)])
    assert np.array_equal(opt.state[0]["momentum_buffer"], np.full(4, 2.0))
    opt.step([np.full(4, 2.0)])  # 0.5*2 + 0.5*2
    assert np.array_equal(opt.state[0]["momentum_buffer"], np.full(4, 2.0))
    q = np.zeros(4)
    opt2 = fastadam.SGD([q], lr=1.0, momentum=0.5, dampening=0.5)
    opt2.load_state_dict(
        {
            "state": {0: {"momentum_buffer": np.full(4, 4.0)}},
            "param_groups": opt.state_dict()["param_groups"],
        }
    )
    opt2.step([np.full(4, 2.0)])  # continues: 0.5*4 + 0.5*2
    assert np.array_equal(opt2.state[0]["momentum_buffer"], np.full(4, 3.0))


def test_options_switched_on_later_get_their_state():
    """RMSprop's momentum and centering, SGD's momentum and ema_decay switched on in a
    group between steps: the new buffers appear (at their initial value) and the step
    follows the reference from there."""
    p = np.ones(5)
    opt = fastadam.RMSprop([p], lr=0.1)
    opt.step([np.ones(5)])
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["centered"] = True
    opt.param_groups[0]["ema_decay"] = 0.5
    opt.step([np.ones(5)])
    st = opt.state[0]
    assert {"momentum_buffer", "grad_avg", "param_ema"} <= set(st)
    assert st["param_ema_step"] == 1
    q = np.ones(5)
    sgd = fastadam.SGD([q], lr=0.1)
    sgd.step([np.ones(5)])
    sgd.param_groups[0]["momentum"] = 0.9
    sgd.param_groups[0]["dampening"] = 0.5
    sgd.step([np.full(5, 3.0)])
    # a new buffer starts at the gradient, as torch's does (not 0.5 * g)
    assert np.array_equal(sgd.state[0]["momentum_buffer"], np.full(5, 3.0))


BAD = [
    ("sgd", dict(lr=-1.0), ValueError, "lr"),
    ("sgd", dict(momentum=-0.1), ValueError, "momentum"),
    ("sgd", dict(momentum="a"), TypeError, "momentum"),
    ("sgd", dict(dampening=float("nan")), ValueError, "dampening"),
    ("sgd", dict(nesterov=True), ValueError, "nesterov"),
    ("sgd", dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov"),
    ("sgd", dict(nesterov="yes"), TypeError, "nesterov"),
    ("adagrad", dict(lr_decay=-1.0), ValueError, "lr_decay"),
    ("adagrad", dict(initial_accumulator_value=-1.0), ValueError, "initial_accumulator"),
    ("adagrad", dict(eps=float("inf")), ValueError, "eps"),
    ("rmsprop", dict(alpha=-0.5), ValueError, "alpha"),
    ("rmsprop", dict(momentum=float("nan")), ValueError, "momentum"),
    ("rmsprop", dict(centered=None), TypeError, "centered"),
    ("adamax", dict(betas=(1.0, 0.9)), ValueError, "betas"),
    ("adamax", dict(betas=0.9), TypeError, "betas"),
    ("nadam", dict(momentum_decay=-1e-3), ValueError, "momentum_decay"),
    ("nadam", dict(decoupled_weight_decay=[1]), TypeError, "decoupled_weight_decay"),
    ("radam", dict(betas=(0.9, -0.1)), ValueError, "betas"),
    ("radam", dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("lion", dict(betas=(1.5, 0.9)), ValueError, "betas"),
    ("lion", dict(lr=float("nan")), ValueError, "lr"),
    ("adam", dict(eps_root=-1.0), ValueError, "eps_root"),
    ("adam", dict(eps_root="0"), TypeError, "eps_root"),
    ("adam", dict(ema_decay=1.0), ValueError, "ema_decay"),
    ("sgd", dict(ema_decay=-0.1), ValueError, "ema_decay"),
    ("lion", dict(ema_decay="0.9"), TypeError, "ema_decay"),
]


@pytest.mark.parametrize(
    "rule, kw, exc, name", BAD, ids=[f"{r}-{'-'.join(k)}" for r, k, _, _ in BAD]
)
def test_bad_hyperparameters_are_refused_naming_them(rule, kw, exc, name):
    p = np.ones(3)
    with pytest.raises(exc, match=name):
        RULES[rule][0]([p], **kw)
    # the same value put into a group between steps: refused at the step, nothing moves
    opt = RULES[rule][0]([p])
    opt.step([np.ones(3)])
    before = copy.deepcopy(opt.state_dict())
    saved = p.copy()
    opt.param_groups[0].update(kw)
    with pytest.raises(exc, match=name):
        opt.step([np.ones(3)])
    assert np.array_equal(p, saved)
    after = opt.state_dict()
    assert after["step_count"] == before["step_count"]


@pytest.mark.parametrize("rule", list(RULES))
def test_common_options_work_for_every_rule(rule):
    """Clipping, loss scaling, skip_nonfinite, lr schedules and threads: the result equals
    the reference fed the gradients as those options would change them."""
    cls, _, _ = RULES[rule]
    kw = dict(momentum=0.9) if rule == "sgd" else {}
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(300)
    gs = [rng.standard_normal(300) for _ in range(4)]
    # grad_scale = 4 on gradients 4x larger is the same step (4 is a power of 2)
    a, b = p0.copy(), p0.copy()
    oa, ob = cls([a], **kw), cls([b], num_threads=2, **kw)
    for g in gs:
        oa.step([g])
        ob.step([g * 4.0], grad_scale=4.0)
    assert np.array_equal(a, b)
    # clipping to max_grad_norm = the step on the clipped gradient
    c, d = p0.copy(), p0.copy()
    oc, od = cls([c], max_grad_norm=1.0, **kw), cls([d], **kw)
    for g in gs:
        oc.step([g])
        norm = float(np.sqrt(np.sum(g * g)))
        assert math.isclose(oc.last_grad_norm, norm, rel_tol=1e-12)
        coef = min(1.0 / (norm + 1e-6), 1.0)
        od.step([g], grad_scale=1.0 / coef)
    assert np.allclose(c, d, rtol=1e-12, atol=1e-15)
    # skip_nonfinite: nothing moves
    e = p0.copy()
    oe = cls([e], skip_nonfinite=True, **kw)
    oe.step([gs[0]])
    snap = (e.copy(), copy.deepcopy(oe.state_dict()))
    bad = gs[1].copy()
    bad[7] = np.nan
    assert oe.step([bad]) is False
    assert np.array_equal(e, snap[0])
    assert oe.state_dict()["step_count"] == snap[1]["step_count"]
    # a schedule: lr(t) called with the 1-based step
    seen = []
    f = p0.copy()
    of = cls([f], lr=lambda t: seen.append(t) or 0.01, **kw)
    for g in gs:
        of.step([g])
    assert seen == [1, 2, 3, 4]
    of2 = cls([p0.copy()], lr=fastadam.InverseSqrtDecay(0.01), **kw)
    of2.step([gs[0]])


def test_required_state_missing_is_refused_before_anything_moves():
    """A state stream the options need that is absent at step time (a plan built by
    hand) is refused with a ValueError naming it; nothing is written."""
    spec_index = _core.RULE_NAMES.index("rmsprop")
    p, sq = np.ones(4), np.zeros(4)
    plan = _core._Plan(
        spec_index,
        ("square_avg", "momentum_buffer", "grad_avg"),
        [p],
        [(sq, None, None)],
        None,
        [0],
        1,
        True,
    )
    plan.set_options(0, 0.1, 0.0, False, None, (0.99, 1e-8, 0.9, 0.0))  # momentum 0.9
    with pytest.raises(ValueError, match="momentum_buffer"):
        plan.step([np.ones(4)])
    assert np.array_equal(p, np.ones(4)) and np.array_equal(sq, np.zeros(4))
    plan.set_options(0, 0.1, 0.0, False, 0.5, (0.99, 1e-8, 0.0, 0.0))  # ema, no buffer
    with pytest.raises(ValueError, match="param_ema"):
        plan.step([np.ones(4)])
    assert np.array_equal(p, np.ones(4))


SPECIALS = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 1e30, -3e38, 1.0, -1.0, 5e-324],
    dtype=np.float64,
)


@pytest.mark.parametrize("rule, kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_special_values_follow_the_reference(isa, rule, kw, dtype):
    """Zeros of both signs, infinities, NaN, subnormals and huge values in the gradient
    and the parameters: the kernels give the reference's values, signs of zeros included
    (Lion's sign(0) = 0, AdaMax's select with NaN, ...)."""
    cls = RULES[rule][0]
    with np.errstate(over="ignore"):
        vals = SPECIALS.astype(dtype)
    n = len(vals)
    params0 = np.concatenate([np.zeros(n), np.ones(n), vals]).astype(dtype)
    grads = [
        np.concatenate([vals, vals, np.zeros(n)]).astype(dtype),
        np.concatenate([np.zeros(n), vals[::-1], vals]).astype(dtype),
    ]
    ref = params0.copy()
    state = _ref_state(rule, kw, ref)
    scalar = 1.0
    for t, g in enumerate(grads, 1):
        scalar = _ref_step(rule, ref, g, state, t, kw, scalar)
    p = params0.copy()
    opt = cls([p], **kw)
    opt._isa = isa
    for g in grads:
        opt.step([g])
    assert np.array_equal(p, ref, equal_nan=True), (rule, kw, p, ref)
    ok = ~np.isnan(ref)
    assert np.array_equal(np.signbit(p[ok]), np.signbit(ref[ok])), (rule, kw)


def test_lion_sign_of_zero_is_zero():
    """sign(0) = 0, as torch.sign: a zero gradient on a zero momentum leaves p alone."""
    p = np.array([1.0, -2.0, 3.0])
    opt = fastadam.Lion([p], lr=0.1)
    opt.step([np.array([0.0, -0.0, 1.0])])
    assert np.array_equal(p, [1.0, -2.0, 2.9])


@pytest.mark.parametrize("rule", list(RULES))
def test_a_step_of_every_rule_allocates_no_buffers(rule):
    """With every stream the rule can have (and the average), a step over 1e6 parameters
    allocates no array memory: only a few small Python objects."""
    import tracemalloc

    kw = {
        "sgd": dict(momentum=0.9, nesterov=True),
        "rmsprop": dict(momentum=0.9, centered=True),
        "adam": dict(amsgrad=True, eps_root=1e-8),
    }.get(rule, {})
    params = [np.zeros(500_000, np.float32), np.zeros((500, 1000), np.float32)]
    grads = [np.ones_like(p) for p in params]
    opt = RULES[rule][0](params, ema_decay=0.9, max_grad_norm=1.0, **kw)
    opt.step(grads)
    tracemalloc.start()
    try:
        opt.step(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096, f"a step allocated {peak} bytes"
