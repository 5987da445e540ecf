"""fastadam.torch.SGD, Adagrad, RMSprop, Adamax, NAdam, RAdam and Lion (and the shared
engine under Adam/AdamW) against torch.optim and against the NumPy API.

The problem and the bounds are those of tests/test_reference_rules.py (imported from it):
a closed loop, g = s * h * (p - c + xi_t), 300 steps, and elementwise, over torch's
trajectory,

    |p_fa - p_torch| <= K_P * t * eps_T * (P + U),
    |s_fa - s_torch| <= K_S * t * eps_T * (S + G**k)   (K_B * t * eps_T * S for RMSprop's
                                                       momentum_buffer)

where that module explains why. fastadam.torch runs the same C kernels as the NumPy API,
which reproduce fastadam.reference bit for bit, so its distance to torch is the
reference's (measured there) -- with one difference: NAdam's mu_product is a tensor of
torch's default scalar dtype here, as in torch (the reference and the NumPy API keep a
double), which brings float32 runs a little closer to torch.

1. agreement with torch.optim.X(foreach=False), float32 and float64, every case of that
   module (Lion: against the torch implementation there);
2. the same bits as the NumPy API (fastadam.X) on the same problem, float32, with two
   param groups, ema_decay, max_grad_norm and grad_scale (NAdam under torch's default
   dtype float64, so that its mu_product is a double like the NumPy API's);
3. state_dict interchange with torch both ways, through torch.save/torch.load, against the
   uninterrupted torch run (same keys as torch; SGD's loaded momentum_buffer continues,
   it does not restart as buf = g);
4. torch's exception types and messages for every hyperparameter torch checks;
5. per rule: param groups, a 0-dim tensor lr, StepLR, torch.amp.GradScaler (fused
   protocol) with injected inf/NaN, fused clipping, parameters without a gradient, a
   complex parameter, num_threads and the temporal average (ema_decay), against
   torch.optim.X under GradScaler with unscale_ and clipping (in double); the average is
   checked bit for bit against its recurrence computed in NumPy;
plus ZeroRedundancyOptimizer (two ranks) with SGD and NAdam, and refused state dicts.
"""

import copy
import inspect
import io
import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")

import test_reference_rules as ref  # noqa: E402  (the closed-loop problem and its bounds)
from ranks import launch  # noqa: E402  (the 2-process gloo launcher)

import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402

RULES = ["SGD", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Lion"]
CLIP = 30.0  # max_grad_norm: the problem's gradient norms run from about 10 to 40
TORCH_RULES = RULES[:-1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TorchLion(torch.optim.Optimizer):
    """Lion as a torch.optim.Optimizer (param groups, state_dict, schedulers, GradScaler),
    with tests/test_reference_rules.py's operations (each exactly rounded, the
    reference's), so that it is bit-identical to the reference there."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(
            params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = float(group["lr"]), group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                grad = -p.grad if group["maximize"] else p.grad
                p_, g, m = (
                    torch.view_as_real(x) if x.is_complex() else x
                    for x in (p, grad, state["exp_avg"])
                )
                p_.mul_(1.0 - lr * wd)
                update = (m * beta1 + g * (1.0 - beta1)).sign_()
                p_.add_(update, alpha=-lr)
                m.mul_(beta2).add_(g * (1.0 - beta2))


def _torch_class(rule):
    return TorchLion if rule == "Lion" else getattr(torch.optim, rule)


def _torch_opt(rule, params, **kw):
    if rule != "Lion":
        kw["foreach"] = False
    return _torch_class(rule)(params, **kw)


def _sign(options):
    return -1.0 if options.get("maximize", False) else 1.0


def _numpy_state(opt, params):
    """Each parameter's state as {key: ndarray} (the tensors of the rule's streams)."""
    return [
        {k: v.numpy() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.dim()}
        for p in params
    ]


def _real(p):
    return torch.view_as_real(p) if p.is_complex() else p


def _run(opt, ps, name, dtype, start, stop):
    """Steps start..stop (1-based, inclusive) of the closed loop of test_reference_rules
    (a complex parameter is the pairs of reals of its view_as_real)."""
    _, _lr, options = ref.CASES[name]
    _, h, c, noise = ref._problem(dtype)
    sign = _sign(options)
    for t in range(start, stop + 1):
        for i, p in enumerate(ps):
            a = _real(p).detach().numpy()
            g = torch.from_numpy(
                ref._grad(a.reshape(h[i].shape), h[i], c[i], noise[t - 1][i], sign).reshape(a.shape)
            )
            p.grad = torch.view_as_complex(g) if p.is_complex() else g
        opt.step()


def _check_ratios(dtype, name, ratios):
    rule = ref.CASES[name][0]
    for k, ratio in ratios.items():
        bound = (
            ref.K_P if k == "p" else (ref.K_B if ref.STATES[rule].get(k, 0) is None else ref.K_S)
        )
        assert ratio <= bound, (
            f"{name} ({np.dtype(dtype).name}): {k} differs from torch's "
            f"by {ratio:.3g} * t * eps * scale; bound {bound}"
        )


# ------------------------------------------------------------- 1. agreement with torch
@pytest.mark.parametrize("name", list(ref.CASES))
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=["f32", "f64"])
def test_matches_torch(dtype, name):
    rule, lr, options = ref.CASES[name]
    r = ref._result(dtype, name)  # torch's run (and the reference's), cached
    p0 = ref._problem(dtype)[0]
    with ref._default_dtype(dtype):
        ps = [torch.tensor(a) for a in p0]
        opt = getattr(ft, rule)(ps, lr=lr, **options)
        _run(opt, ps, name, dtype, 1, ref.STEPS)
    ratios = ref._ratios(dtype, name, r, ref=([p.numpy() for p in ps], _numpy_state(opt, ps)))
    _check_ratios(dtype, name, ratios)
    for p, want in zip(ps, r["torch_state"]):
        got = opt.state[p]
        assert list(got) == list(want)  # torch's keys, in torch's order
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        if "step" in want:
            assert float(got["step"]) == float(want["step"]) == ref.STEPS
        if rule == "NAdam":
            mu, mu_t = float(got["mu_product"]), float(want["mu_product"])
            if dtype == np.float64:
                assert mu == mu_t  # the same double multiplications
            elif mu_t >= 2.0**-126:  # float32: torch rounds mu too (see the module docstring)
                assert abs(mu - mu_t) <= ref.STEPS * 2.0**-23 * mu_t
    if rule == "Lion":  # every operation exactly rounded on both sides
        assert all(np.array_equal(p.numpy(), q) for p, q in zip(ps, r["torch_p"]))


# --------------------------------------------------- 2. the same bits as the NumPy API
BITWISE = [
    "sgd",
    "sgd_dampening",
    "sgd_nesterov_l2",
    "sgd_maximize_l2",
    "adagrad_decay_init_l2",
    "rmsprop_momentum",
    "rmsprop_all_maximize",
    "adamax_l2_maximize",
    "nadam",
    "nadam_decoupled_maximize",
    "radam_l2",
    "radam_decoupled_maximize",
    "lion",
    "lion_decay_maximize",
]


@pytest.mark.parametrize("name", BITWISE)
def test_same_bits_as_the_numpy_api(name):
    rule, lr, options = ref.CASES[name]
    dtype = np.float32
    p0, h, c, noise = ref._problem(dtype)
    sign = _sign(options)
    extra = dict(ema_decay=0.9, max_grad_norm=CLIP)

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": lr / 2, "ema_decay": 0.99}]

    npp = [a.copy() for a in p0]
    nopt = getattr(fastadam, rule)(groups(npp), lr=lr, **options, **extra)
    # NAdam: torch's default dtype float64 makes mu_product a double, as the NumPy API's
    with ref._default_dtype(np.float64 if rule == "NAdam" else dtype):
        tps = [torch.tensor(a) for a in p0]
        topt = getattr(ft, rule)(groups(tps), lr=lr, **options, **extra)
        norms = []
        for t in range(1, ref.STEPS + 1):
            scale = 4.0 if t % 2 else 1.0  # exact either way
            gs = [ref._grad(a, h[i], c[i], noise[t - 1][i], sign) for i, a in enumerate(npp)]
            gt = [
                ref._grad(p.numpy(), h[i], c[i], noise[t - 1][i], sign) for i, p in enumerate(tps)
            ]
            nopt.step([g * dtype(scale) for g in gs], grad_scale=scale)
            for p, g in zip(tps, gt):
                p.grad = torch.from_numpy(g * dtype(scale))
            topt.step(grad_scale=scale)
            assert topt.last_grad_norm == nopt.last_grad_norm
            norms.append(topt.last_grad_norm)
    assert max(norms) > CLIP  # clipping was active
    for a, p in zip(npp, tps):
        assert np.array_equal(a, p.numpy())
    for s, p in zip(nopt.state, tps):
        st = topt.state[p]
        assert set(st) == set(s), (sorted(st), sorted(s))
        for k, v in s.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(v, st[k].numpy()), k
            else:  # step, param_ema_step, mu_product
                assert float(v) == float(st[k]), k
        assert int(st["param_ema_step"]) == ref.STEPS
    for a, b in zip(nopt.averaged_params(), topt.averaged_params()):
        assert np.array_equal(a, b.numpy())


def test_adam_extras_same_bits_as_the_numpy_api():
    """Adam's and AdamW's extras (eps_root, ema_decay, in param_groups only when set)."""
    g = torch.Generator().manual_seed(7)
    p0 = [torch.randn(5, 3, generator=g), torch.randn(9, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in p0] for _ in range(20)]
    for cls in ("Adam", "AdamW"):
        kw = dict(lr=1e-2, eps_root=1e-10, ema_decay=0.95, amsgrad=True)
        tps = [p.clone() for p in p0]
        topt = getattr(ft, cls)(tps, **kw)
        assert topt.param_groups[0]["eps_root"] == 1e-10
        assert "eps_root" not in getattr(ft, cls)([torch.ones(2)]).param_groups[0]
        nps = [p.numpy().copy() for p in p0]
        nopt = getattr(fastadam, cls)(nps, **kw)
        for gs in grads:
            for p, gr in zip(tps, gs):
                p.grad = gr
            topt.step()
            nopt.step([gr.numpy() for gr in gs])
        for a, p in zip(nps, tps):
            assert np.array_equal(a, p.numpy())
        for a, b in zip(nopt.averaged_params(), topt.averaged_params()):
            assert np.array_equal(a, b.numpy())


# ---------------------------------------------- 3. state_dict interchange with torch
INTERCHANGE = [
    "sgd_dampening",
    "sgd_nesterov_l2",
    "adagrad_decay_init_l2",
    "rmsprop_all_maximize",
    "adamax_l2_maximize",
    "nadam_decoupled_maximize",
    "radam_l2",
    "lion_decay_maximize",
]
SWITCH = 100


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["torch_to_fastadam", "fastadam_to_torch"])
@pytest.mark.parametrize("name", INTERCHANGE)
def test_state_dict_interchange(name, direction):
    """Train SWITCH steps with one, checkpoint parameters and optimizer, continue to 300
    steps with the other; compare with torch's uninterrupted run."""
    rule, lr, options = ref.CASES[name]
    dtype = np.float32
    r = ref._result(dtype, name)
    p0 = ref._problem(dtype)[0]

    def make_torch(ps):
        return _torch_opt(rule, ps, lr=lr, **options)

    def make_fa(ps):
        return getattr(ft, rule)(ps, lr=lr, **options)

    first, second = make_torch, make_fa
    if direction == "fastadam_to_torch":
        first, second = make_fa, make_torch
    with ref._default_dtype(dtype):
        pa = [torch.tensor(a) for a in p0]
        oa = first(pa)
        _run(oa, pa, name, dtype, 1, SWITCH)
        ckpt = _roundtrip({"params": pa, "opt": oa.state_dict()})
        pb = [t.clone() for t in ckpt["params"]]
        ob = second(pb)
        ob.load_state_dict(ckpt["opt"])
        mine, theirs = (ob, oa) if direction == "torch_to_fastadam" else (oa, ob)
        sd_mine, sd_theirs = mine.state_dict(), theirs.state_dict()
        assert list(sd_mine["state"]) == list(sd_theirs["state"])
        for i, entry in sd_theirs["state"].items():
            assert list(sd_mine["state"][i]) == list(entry)
        assert sd_mine["param_groups"] == sd_theirs["param_groups"]
        _run(ob, pb, name, dtype, SWITCH + 1, ref.STEPS)
    ratios = ref._ratios(dtype, name, r, ref=([p.numpy() for p in pb], _numpy_state(ob, pb)))
    _check_ratios(dtype, name, ratios)
    for p in pb:
        if "step" in ob.state[p]:
            assert float(ob.state[p]["step"]) == ref.STEPS


def test_sgd_first_step_semantics_match_torch():
    """torch's momentum_buffer starts as buf = g (no dampening) when it is made: at the
    first step, when momentum is switched on midway, and after a refused first step;
    a buffer that exists (loaded, or made earlier) continues with dampening."""
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(6, 5, generator=g)
    grads = [torch.randn(6, 5, generator=g) for _ in range(12)]
    kw = dict(lr=0.1, dampening=0.5)
    pt, pf = p0.clone(), p0.clone()
    ot = torch.optim.SGD([pt], foreach=False, **kw)
    of = ft.SGD([pf], **kw)
    for t, gr in enumerate(grads):
        if t == 4:  # momentum switched on midway: a new buffer, buf = g
            for o in (ot, of):
                o.param_groups[0]["momentum"] = 0.9
            assert not of.state[pf]
            before = pf.clone()
            pf.grad = pf[:]  # refused (the gradient aliases the parameter): nothing made
            with pytest.raises(ValueError, match="shares memory"):
                of.step()
            assert not of.state[pf] and torch.equal(pf, before)
        pt.grad, pf.grad = gr.clone(), gr.clone()
        ot.step()
        of.step()
        # (torch fuses some multiply-adds: an ulp here and there; a buffer restarted as
        # buf = g, or not restarted, would be off by half of g)
        torch.testing.assert_close(pf, pt, rtol=1e-6, atol=1e-6, msg=f"step {t}")
        if t >= 4:
            torch.testing.assert_close(
                of.state[pf]["momentum_buffer"],
                ot.state[pt]["momentum_buffer"],
                rtol=1e-6,
                atol=1e-6,
            )
    assert of.state_dict()["state"].keys() == ot.state_dict()["state"].keys()


def test_sgd_without_momentum_keeps_no_state_as_torch():
    pt, pf = torch.ones(3), torch.ones(3)
    ot, of = torch.optim.SGD([pt], lr=0.1, foreach=False), ft.SGD([pf], lr=0.1)
    for o, p in ((ot, pt), (of, pf)):
        p.grad = torch.full((3,), 0.5)
        o.step()
    assert torch.equal(pt, pf)
    theirs = ot.state_dict()
    theirs["param_groups"][0]["foreach"] = None  # (torch's was built with foreach=False)
    assert of.state_dict() == theirs


def test_state_of_replaced_params_is_left_out_of_state_dict():
    """Adagrad makes state in its constructor; an engine that then swaps the group's
    tensors (DeepSpeed ZeRO) leaves that state orphaned. torch.optim's state_dict raises
    KeyError on it; fastadam's leaves it out, keeps it in opt.state, and the result loads
    into a fresh optimizer that steps on like the original."""
    old, new = torch.ones(4), torch.ones(6)
    opt = ft.Adagrad([old], lr=0.1)
    theirs = torch.optim.Adagrad([torch.ones(4)], lr=0.1)
    theirs.param_groups[0]["params"] = [torch.ones(6)]
    with pytest.raises(KeyError):
        theirs.state_dict()
    opt.param_groups[0]["params"] = [new]
    assert opt.state_dict()["state"] == {}
    new.grad = torch.full((6,), 0.25)
    opt.step()
    sd = opt.state_dict()
    assert list(sd["state"]) == [0] and torch.equal(sd["state"][0]["sum"], torch.full((6,), 0.0625))
    assert old in opt.state  # left where it was
    twin_p = new.clone()
    twin = ft.Adagrad([twin_p], lr=0.1)
    twin.load_state_dict(copy.deepcopy(sd))  # (state_dict holds the live tensors, as torch's)
    for o, p in ((opt, new), (twin, twin_p)):
        p.grad = torch.full((6,), -0.5)
        o.step()
    assert torch.equal(new, twin_p)


# ------------------------------------------------------------------ 4. torch's errors
BAD = {
    "SGD": [
        dict(lr=-1.0),
        dict(lr=torch.tensor([1e-3, 1e-3])),
        dict(lr=torch.tensor(-0.5)),
        dict(momentum=-0.1),
        dict(weight_decay=-1e-2),
        dict(nesterov=True),
        dict(momentum=0.9, dampening=0.1, nesterov=True),
        dict(lr=-1.0, momentum=-1.0),
    ],
    "Adagrad": [
        dict(lr=-1),
        dict(lr_decay=-0.1),
        dict(weight_decay=-1.0),
        dict(initial_accumulator_value=-0.5),
        dict(eps=-1e-10),
        dict(lr_decay=-1.0, eps=-1.0),
    ],
    "RMSprop": [
        dict(lr=-1e-2),
        dict(eps=-1.0),
        dict(momentum=-0.5),
        dict(weight_decay=-2),
        dict(alpha=-0.9),
        dict(alpha=-1.0, momentum=-1.0),
    ],
    "Adamax": [
        dict(lr=-2e-3),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.1)),
        dict(weight_decay=-1.0),
        dict(betas=(1.5, 0.5), weight_decay=-1.0),
        dict(eps=-1.0, betas=(1.5, 0.5)),
    ],
    "NAdam": [
        dict(lr=-1.0),
        dict(eps=-1.0),
        dict(betas=(-0.1, 0.999)),
        dict(betas=(0.9, 1.0)),
        dict(weight_decay=-0.1),
        dict(momentum_decay=-4e-3),
        dict(betas=(1.5, 0.5), weight_decay=-1.0),
    ],
    "RAdam": [
        dict(lr=-1.0),
        dict(eps=-1.0),
        dict(betas=(2.0, 0.999)),
        dict(betas=(0.9, 1.5)),
        dict(weight_decay=-1e-2),
        dict(betas=(1.5, 0.5), weight_decay=-1.0),
    ],
}


@pytest.mark.parametrize(
    "rule, bad",
    [(r, b) for r, bs in BAD.items() for b in bs],
    ids=lambda x: x if isinstance(x, str) else repr(x),
)
def test_bad_hyperparameters_raise_as_torch(rule, bad):
    with pytest.raises(Exception) as want:
        getattr(torch.optim, rule)([torch.zeros(3, requires_grad=True)], **bad)
    with pytest.raises(want.type) as got:
        getattr(ft, rule)([torch.zeros(3, requires_grad=True)], **bad)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("rule", RULES)
def test_bad_options_at_step_time_raise_as_torch_and_change_nothing(rule):
    """torch checks in the constructor only; fastadam checks a changed group at the next
    step, with the constructor's message, before anything (state included) is made."""
    p = torch.ones(4, requires_grad=True)
    opt = getattr(ft, rule)([p], momentum=0.9) if rule == "SGD" else getattr(ft, rule)([p])
    p.grad = torch.ones(4)
    for key, value, message in (
        ("lr", -1.0, "Invalid learning rate: -1.0"),
        ("weight_decay", -2, "Invalid weight_decay value: -2"),
        ("lr", torch.tensor([1.0, 2.0]), "Tensor lr must be 1-element"),
    ):
        saved = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        with pytest.raises(ValueError) as e:
            opt.step()
        assert str(e.value) == message
        opt.param_groups[0][key] = saved
    if rule == "Adagrad":  # torch's Adagrad makes its state in the constructor
        assert float(opt.state[p]["step"]) == 0 and not opt.state[p]["sum"].any()
    else:
        assert not opt.state
    assert torch.equal(p.detach(), torch.ones(4))
    opt.step()
    assert not torch.equal(p.detach(), torch.ones(4))


@pytest.mark.parametrize("rule", RULES)
def test_fastadam_refuses_what_torch_lets_through(rule):
    ps = [torch.zeros(3, requires_grad=True)]
    cls = getattr(ft, rule)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        cls(ps, lr=float("inf"))
    with pytest.raises(ValueError, match="max_grad_norm"):
        cls(ps, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="num_threads"):
        cls(ps, num_threads=0)
    with pytest.raises(ValueError, match="ema_decay"):
        cls(ps, ema_decay=1.0)
    with pytest.raises(TypeError, match="ema_decay"):
        cls(ps, ema_decay="0.9")
    for flag in ("capturable", "differentiable"):
        if flag in inspect.signature(cls.__init__).parameters:
            with pytest.raises(NotImplementedError, match=flag):
                cls(ps, **{flag: True})
    for flag in ("foreach", "fused"):
        if flag in inspect.signature(cls.__init__).parameters:
            assert cls(ps, **{flag: True}).param_groups[0][flag] is True  # accepted, no effect


def test_lion_messages_in_torch_style():
    ps = [torch.zeros(3, requires_grad=True)]
    for bad, message in (
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
        (dict(betas=(1.5, 0.9)), "Invalid beta parameter at index 0: 1.5"),
        (dict(betas=(0.9, -0.5)), "Invalid beta parameter at index 1: -0.5"),
    ):
        with pytest.raises(ValueError) as e:
            ft.Lion(ps, **bad)
        assert str(e.value) == message
    ft.Lion(ps, betas=(1.0, 0.0))  # Lion's betas may be 0 or 1


@pytest.mark.parametrize("rule", TORCH_RULES + ["Adam", "AdamW"])
def test_constructor_matches_torch_signature(rule):
    mine = inspect.signature(getattr(ft, rule).__init__).parameters
    theirs = inspect.signature(getattr(torch.optim, rule).__init__).parameters
    assert list(mine)[: len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert mine[name].default == p.default and mine[name].kind == p.kind, name
    extras = {
        "max_grad_norm": None,
        "num_threads": None,
        "ema_decay": None,
        "master_weights": False,
        "state_dtype": None,
        "rounding": "nearest",
        "seed": 0,
    }
    if rule in ("Adam", "AdamW"):
        extras["eps_root"] = 0.0
    assert {k: p.default for k, p in mine.items() if k not in theirs} == extras
    assert all(mine[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extras)


def test_lion_signature():
    mine = inspect.signature(ft.Lion.__init__).parameters
    assert [(k, p.default) for k, p in mine.items()][1:] == [
        ("params", inspect.Parameter.empty),
        ("lr", 1e-4),
        ("betas", (0.9, 0.99)),
        ("weight_decay", 0.0),
        ("maximize", False),
        ("max_grad_norm", None),
        ("num_threads", None),
        ("ema_decay", None),
        ("master_weights", False),
        ("state_dtype", None),
        ("rounding", "nearest"),
        ("seed", 0),
    ]


# ------------------------------------------- 5. groups, schedulers, AMP, clipping, EMA
FEATURES = {
    "SGD": "sgd_nesterov_l2",
    "Adagrad": "adagrad_decay_init_l2",
    "RMSprop": "rmsprop_all_maximize",
    "Adamax": "adamax_l2_maximize",
    "NAdam": "nadam_decoupled_maximize",
    "RAdam": "radam_decoupled_maximize",
    "Lion": "lion",
}
ADAM_CASES = {
    "Adam": ("Adam", 1e-3, dict(weight_decay=1e-2, amsgrad=True)),
    "AdamW": ("AdamW", 1e-3, dict(weight_decay=0.1, maximize=True)),
}
ADAM_STATES = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
FEATURE_STEPS = 120
INJECT = {17, 50, 51, 90}  # inf/NaN in a gradient: GradScaler skips these steps
EMA = (0.9, 0.99)  # the two groups' ema_decay


def _clip_in_double(params, max_norm):
    """clip_grad_norm_ with the norm in double (as fastadam computes it)."""
    grads = [
        torch.view_as_real(p.grad) if p.is_complex() else p.grad
        for p in params
        if p.grad is not None
    ]
    norm = float(torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


@pytest.mark.parametrize("rule", RULES + ["Adam", "AdamW"])
def test_groups_scheduler_amp_clipping_none_grads_and_ema(rule):
    """fastadam.torch.X(max_grad_norm, ema_decay, num_threads=2) stepped by
    GradScaler.step (fused: grad_scale/found_inf) vs torch.optim.X with unscale_ and
    clip_grad_norm_ (in double) before GradScaler.step; two param groups (the first with
    a 0-dim tensor lr), StepLR, inf/NaN injected at some steps, one parameter without a
    gradient now and then. (No complex parameter: GradScaler's CPU unscale kernel has
    none; see test_complex_parameters_are_pairs_of_reals.)"""
    name = FEATURES.get(rule)
    rule_, lr, options = ref.CASES[name] if name else ADAM_CASES[rule]
    dtype = np.float32
    p0, h, c, noise = ref._problem(dtype)
    sign = _sign(options)
    real = _real

    def make():
        return [torch.tensor(a) for a in p0]

    def groups(ps, tensor_lr):
        lr0 = torch.tensor(lr) if tensor_lr else float(torch.tensor(lr))  # the same value
        return [
            {"params": ps[:3], "lr": lr0, "ema_decay": EMA[0]},
            {"params": ps[3:], "lr": float(torch.tensor(lr)) / 2, "ema_decay": EMA[1]},
        ]

    sides = {}
    for side in ("torch", "fastadam"):
        ps = make()
        if side == "torch":
            gs = groups(ps, False)
            for g in gs:
                del g["ema_decay"]
            opt = _torch_opt(rule_, gs, lr=lr, **options)
        else:
            opt = getattr(ft, rule_)(
                groups(ps, True), lr=lr, max_grad_norm=CLIP, num_threads=2, **options
            )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=20)
        sides[side] = (ps, opt, sched, scaler)

    P = [np.zeros(real(p).shape) for p in sides["torch"][0]]
    U = [np.zeros_like(a) for a in P]
    G = [np.zeros_like(a) for a in P]
    S = [{} for _ in P]
    ema = [np.zeros(real(p).shape, dtype) for p in sides["fastadam"][0]]
    ema_t = [0] * len(ema)
    taken = [0] * len(ema)
    scales, norms = set(), []
    for t in range(1, FEATURE_STEPS + 1):
        without = 4 if t % 7 == 3 else None  # no gradient for this parameter at this step
        for side, (ps, opt, sched, scaler) in sides.items():
            scaler.scale(torch.ones(()))  # (GradScaler makes its scale lazily)
            scale = scaler.get_scale()
            before = [real(p).numpy().astype(np.float64) for p in ps]
            for i, p in enumerate(ps):
                if i == without:
                    p.grad = None
                    continue
                g = ref._grad(real(p).numpy(), h[i], c[i], noise[t - 1][i], sign)
                if side == "torch":
                    np.maximum(G[i], np.abs(g), out=G[i])
                g = torch.from_numpy(g * dtype(scale))
                p.grad = torch.view_as_complex(g) if p.is_complex() else g
            if t in INJECT:
                real(ps[t % 4].grad).view(-1)[t % 3] = float("inf") if t % 2 else float("nan")
            if side == "torch":
                scaler.unscale_(opt)
                _clip_in_double(ps, CLIP)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if side == "fastadam":
                scales.add(scale)
                if t not in INJECT:
                    norms.append(opt.last_grad_norm)
                    for i, p in enumerate(ps):  # the temporal average, in NumPy
                        if i == without:
                            continue
                        d = EMA[i >= 3]
                        ema[i] = ema[i] * dtype(d) + dtype(1.0 - d) * real(p).numpy()
                        ema_t[i] += 1
            else:
                for i, p in enumerate(ps):
                    now = real(p).numpy().astype(np.float64)
                    np.maximum(P[i], np.abs(now), out=P[i])
                    np.maximum(U[i], np.abs(now - before[i]), out=U[i])
                    taken[i] += t not in INJECT and i != without
                    for k, v in opt.state[p].items():
                        if isinstance(v, torch.Tensor) and v.dim():
                            s = S[i].setdefault(k, np.zeros(P[i].shape))
                            np.maximum(s, np.abs(real(v).numpy()), out=s)

    (tp, topt, _, tscaler), (fp, fopt, _, fscaler) = sides["torch"], sides["fastadam"]
    assert fscaler.get_scale() == tscaler.get_scale() and len(scales) > 2  # grew, backed off
    assert max(norms) > CLIP  # clipping was active
    assert isinstance(fopt.param_groups[0]["lr"], torch.Tensor)
    assert float(fopt.param_groups[0]["lr"]) == topt.param_groups[0]["lr"] < lr / 2
    eps = float(np.finfo(dtype).eps)
    moved = max(float(np.abs(real(a).numpy() - b).max()) for a, b in zip(fp, p0))
    assert moved > 1e3 * ref.K_P * FEATURE_STEPS * eps * 5  # not vacuous
    states = ADAM_STATES if rule in ("Adam", "AdamW") else ref.STATES[rule]
    for i, (a, b) in enumerate(zip(fp, tp)):
        n = taken[i]
        diff = np.abs(real(a).numpy().astype(np.float64) - real(b).numpy())
        assert np.all(diff <= ref.K_P * n * eps * (P[i] + U[i])), (i, float(diff.max()))
        sa, sb = fopt.state[a], topt.state[b]
        assert [k for k in sa if k not in ("param_ema", "param_ema_step")] == list(sb)
        if "step" in sb:
            assert float(sa["step"]) == float(sb["step"]) == n
        for k, power in states.items():
            if k not in sb:
                continue
            scale = S[i][k] + (0.0 if power is None else G[i] ** power)
            bound = (ref.K_B if power is None else ref.K_S) * n * eps * np.maximum(scale, 1e-300)
            d = np.abs(real(sa[k]).numpy().astype(np.float64) - real(sb[k]).numpy())
            assert np.all(d <= bound), (i, k, float((d / bound).max()))
        # the temporal average: the recurrence, bit for bit, and its bias correction
        assert int(sa["param_ema_step"]) == ema_t[i] == n
        assert np.array_equal(real(sa["param_ema"]).numpy(), ema[i])
    for i, (avg, p) in enumerate(zip(fopt.averaged_params(), fp)):
        assert avg.dtype == p.dtype and avg.shape == p.shape and avg is not p
        d = EMA[i >= 3]
        want = ema[i] / dtype(1.0 - d ** ema_t[i])
        assert np.array_equal(real(avg).numpy(), want)
    # the state dict holds the averages too, and loads back
    sd = _roundtrip(fopt.state_dict())
    assert all("param_ema" in e and "param_ema_step" in e for e in sd["state"].values())
    fopt.load_state_dict(sd)
    assert int(fopt.state[fp[0]]["param_ema_step"]) == ema_t[0]
    assert fopt.state[fp[0]]["param_ema_step"].dtype == torch.int64


@pytest.mark.parametrize("rule", RULES)
def test_complex_parameters_are_pairs_of_reals(rule):
    """A complex parameter is updated as the pairs of reals of its view_as_real: the same
    bits as the real run, and torch.optim.X's complex run within the bounds."""
    name = FEATURES[rule]
    rule_, lr, options = ref.CASES[name]
    dtype = np.float32
    p0 = ref._problem(dtype)[0]
    runs = {}
    with ref._default_dtype(dtype):
        for kind in ("real", "complex", "torch"):
            ps = [torch.tensor(a) for a in p0]
            if kind != "real":  # (2, 3, 4) as complex (2, 3, 2)
                ps[2] = torch.view_as_complex(ps[2].reshape(2, 3, 2, 2))
            opt = (
                _torch_opt(rule_, ps, lr=lr, **options)
                if kind == "torch"
                else getattr(ft, rule_)(ps, lr=lr, **options)
            )
            _run(opt, ps, name, dtype, 1, ref.STEPS)
            runs[kind] = (
                [_real(p).numpy().reshape(a.shape) for p, a in zip(ps, p0)],
                [
                    {k: _real(v).reshape(a.shape) for k, v in opt.state[p].items() if v.dim()}
                    for p, a in zip(ps, p0)
                ],
            )
    assert ps[2].dtype == torch.complex64
    (rp, rs), (cp, cs), (tp, ts) = runs["real"], runs["complex"], runs["torch"]
    for a, b in zip(rp, cp):
        assert np.array_equal(a, b)
    for a, b in zip(rs, cs):
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = dict(ref._result(dtype, name), torch_p=tp, torch_state=ts)  # P, U, G, S: real run's
    _check_ratios(
        dtype,
        name,
        ref._ratios(dtype, name, r, ref=(cp, [{k: v.numpy() for k, v in s.items()} for s in cs])),
    )


@pytest.mark.parametrize("rule", RULES)
def test_averaged_params_needs_ema_decay_and_copies_before_any_step(rule):
    ps = [torch.ones(3), torch.ones(2, dtype=torch.complex64)]
    opt = getattr(ft, rule)([{"params": ps[:1]}, {"params": ps[1:], "ema_decay": 0.5}])
    with pytest.raises(ValueError, match="param group 0 has no ema_decay"):
        opt.averaged_params()
    opt.param_groups[0]["ema_decay"] = 0.9
    avg = opt.averaged_params()
    assert all(torch.equal(a, p) and a.data_ptr() != p.data_ptr() for a, p in zip(avg, ps))


@pytest.mark.parametrize("rule", RULES)
def test_ema_switched_on_midway_and_torch_checkpoint_keeps_constructor_ema(rule):
    """ema_decay set on a group later starts param_ema at the next step; a checkpoint of
    torch.optim (no ema_decay) loaded into fastadam.torch.X(ema_decay=...) keeps the
    constructor's ema_decay."""
    p = torch.ones(5)
    opt = getattr(ft, rule)([p], lr=1e-2)
    assert "ema_decay" not in opt.param_groups[0]  # only when set, as torch's groups
    for _ in range(3):
        p.grad = torch.full((5,), 0.5)
        opt.step()
    assert "param_ema" not in opt.state.get(p, {})
    opt.param_groups[0]["ema_decay"] = 0.5
    p.grad = torch.full((5,), 0.5)
    opt.step()
    assert int(opt.state[p]["param_ema_step"]) == 1
    assert torch.equal(opt.state[p]["param_ema"], 0.5 * p.detach())
    assert torch.equal(opt.averaged_params()[0], p.detach())
    q = torch.ones(5)
    theirs = _torch_opt(rule, [q], lr=1e-2)
    q.grad = torch.full((5,), 0.5)
    theirs.step()
    r = q.detach().clone()
    mine = getattr(ft, rule)([r], lr=1e-2, ema_decay=0.9)
    mine.load_state_dict(_roundtrip(theirs.state_dict()))
    assert mine.param_groups[0]["ema_decay"] == 0.9
    r.grad = torch.full((5,), 0.5)
    mine.step()
    assert int(mine.state[r]["param_ema_step"]) == 1


@pytest.mark.parametrize("rule", RULES)
def test_pickle_and_deepcopy_keep_everything(rule):
    import pickle

    p = torch.ones(4, requires_grad=True)
    kw = dict(momentum=0.9) if rule == "SGD" else {}
    opt = getattr(ft, rule)(
        [p], lr=torch.tensor(1e-2), max_grad_norm=1.5, num_threads=1, ema_decay=0.9, **kw
    )
    for _ in range(3):
        p.grad = torch.linspace(-1, 1, 4)
        opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.max_grad_norm == 1.5 and clone.num_threads == 1
        q = clone.param_groups[0]["params"][0]
        assert list(clone.state[q]) == list(opt.state[p])
        q.grad = torch.linspace(-1, 1, 4)
        clone.step()
        assert int(clone.state[q]["param_ema_step"]) == 4


# ------------------------------------------------------------ refused state dicts
def _bad_entries(rule):
    """(edit of a state entry, exception, message) for a state_dict of `rule`."""
    key = {
        "SGD": "momentum_buffer",
        "Adagrad": "sum",
        "RMSprop": "square_avg",
        "Adamax": "exp_inf",
        "NAdam": "exp_avg_sq",
        "RAdam": "exp_avg",
        "Lion": "exp_avg",
    }[rule]
    out = [
        (lambda e: e.__setitem__(key, torch.zeros(7)), ValueError, "shape"),
        (lambda e: e.__setitem__(key, [0.0] * 6), TypeError, "tensor"),
        (lambda e: e.__setitem__("bogus", torch.zeros(6)), ValueError, "unknown keys"),
        (lambda e: e.__setitem__("param_ema_step", -1), ValueError, "param_ema_step"),
    ]
    if rule not in ("SGD",):
        out.append((lambda e: e.pop(key), ValueError, f"lacks \\['{key}'\\]"))
    if rule not in ("SGD", "Lion"):
        out.append((lambda e: e.__setitem__("step", torch.tensor(-1.0)), ValueError, ">= 0"))
    else:
        out.append((lambda e: e.__setitem__("step", torch.tensor(1.0)), ValueError, "unknown keys"))
    if rule == "NAdam":
        out.append((lambda e: e.__setitem__("mu_product", 1.5), ValueError, "mu_product"))
    return out


@pytest.mark.parametrize("rule", RULES)
def test_load_state_dict_refuses_bad_entries_and_changes_nothing(rule):
    p = torch.ones(6)
    kw = dict(momentum=0.9) if rule == "SGD" else {}
    opt = getattr(ft, rule)([p], ema_decay=0.9, **kw)
    p.grad = torch.linspace(-1, 1, 6)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for edit, exc, match in _bad_entries(rule):
        d = copy.deepcopy(sd)
        edit(d["state"][0])
        before = {k: v.clone() for k, v in opt.state[p].items()}
        groups = [dict(g) for g in opt.param_groups]
        with pytest.raises(exc, match=match):
            opt.load_state_dict(d)
        assert [dict(g) for g in opt.param_groups] == groups
        assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    opt.load_state_dict(sd)
    opt.step()


# ------------------------------------------------------------------------- ZeRO
ZERO_STEPS = 30
ZERO_CASES = {
    "SGD": dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "Adagrad": dict(lr=1e-2, lr_decay=1e-3, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True),
    "Adamax": dict(lr=2e-3, weight_decay=1e-2),
    "NAdam": dict(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    "RAdam": dict(lr=1e-3, weight_decay=1e-2),
    "Lion": dict(lr=1e-4, weight_decay=1e-1, ema_decay=0.9),
}
ZERO_WORKER = textwrap.dedent(r"""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastadam.torch

    rank, world, port, out, steps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                     sys.argv[4], int(sys.argv[5]))
    cases = json.loads(sys.argv[6])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    results = {}
    for cls, kw in cases.items():
        torch.manual_seed(0)
        net = DDP(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                      torch.nn.Linear(32, 4)))
        opt = ZeroRedundancyOptimizer(net.parameters(),
                                      optimizer_class=getattr(fastadam.torch, cls),
                                      num_threads=1, **kw)
        for _ in range(steps):
            opt.zero_grad()
            ((net(X) - Y) ** 2).mean().backward()
            opt.step()
        local = opt.optim
        assert type(local).__module__ == "fastadam.torch", type(local)
        held = sum(max((v.numel() for v in s.values() if v.dim()), default=0)
                   for s in local.state.values() if s)
        if rank == 0:
            torch.save([p.detach() for p in net.parameters()], f"{out}/{cls}.pt")
        results[cls] = held
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_zero_redundancy_optimizer_with_every_rule(tmp_path):
    """Two ranks (gloo, one batch seen by both): each keeps the state of its shard only,
    and the result is bit for bit the single-process one (g/2 + g/2 == g)."""
    dist = pytest.importorskip("torch.distributed", reason="torch.distributed is unavailable")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    launch(
        tmp_path,
        ZERO_WORKER,
        (ZERO_STEPS, json.dumps(ZERO_CASES)),
        timeout=120,
        what="ZeroRedundancyOptimizer job",
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    for cls, kw in ZERO_CASES.items():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = getattr(ft, cls)(net.parameters(), **kw)
        for _ in range(ZERO_STEPS):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
        numel = sum(p.numel() for p in net.parameters())
        held = [r[cls] for r in ranks]
        assert sum(held) == numel and all(0 < n < numel for n in held), (cls, held)
        sharded = torch.load(tmp_path / f"{cls}.pt", weights_only=True)
        for a, b in zip(sharded, net.parameters()):
            assert torch.equal(a, b.detach()), cls
