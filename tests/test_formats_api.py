"""The NumPy API of the storage formats (docs/formats.md): 16-bit parameters, float32 master
weights, bfloat16 and 8-bit state, stochastic rounding, state_dict round trips and errors,
for every rule. (Bit-exact kernel-vs-reference tests on every SIMD path: test_formats.py.)
"""

import copy
import sys

import numpy as np
import pytest

import fastadam
from fastadam import _formats as F
from fastadam._rules import RULES


# ------------------------------------------------------------ option normalisation
@pytest.mark.parametrize(
    "value, want",
    [
        (None, None),
        (np.float32, "float32"),
        ("float32", "float32"),
        (np.dtype("f4"), "float32"),
        ("bfloat16", "bfloat16"),
        ("8bit", "8bit"),
        (np.float64, "float64"),
        ("torch.bfloat16", "bfloat16"),
        ("f4", "float32"),
        ("torch.float", "float32"),
    ],
)
def test_state_dtype_names(value, want):
    assert F.check_state_dtype(value) == want


def test_state_dtype_recognises_torch_and_ml_dtypes_without_importing_them():
    class FakeTorchDtype:  # what str() of a torch dtype looks like
        __module__ = "torch"

        def __init__(self, name):
            self.name = name

        def __str__(self):
            return "torch." + self.name

    assert F.check_state_dtype(FakeTorchDtype("bfloat16")) == "bfloat16"
    assert F.check_state_dtype(FakeTorchDtype("float32")) == "float32"
    with pytest.raises(ValueError, match="state_dtype"):
        F.check_state_dtype(FakeTorchDtype("float16"))
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert F.check_state_dtype(ml_dtypes.bfloat16) == "bfloat16"
    assert F.check_state_dtype(np.dtype(ml_dtypes.bfloat16)) == "bfloat16"


@pytest.mark.parametrize(
    "value, exc",
    [
        (np.float16, ValueError),
        ("float16", ValueError),
        ("8BIT", ValueError),
        ("int8", ValueError),
        (np.int8, ValueError),
        ("nonsense", ValueError),
        (3, TypeError),
        ([1], TypeError),
        (object(), TypeError),
    ],
)
def test_state_dtype_refused(value, exc):
    with pytest.raises(exc, match="state_dtype"):
        F.check_state_dtype(value)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(rounding="up"), ValueError, "rounding"),
        (dict(rounding=1), TypeError, "rounding"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(master_weights="yes"), TypeError, "master_weights"),
    ],
)
def test_format_options_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        F.check_formats(**kw)


def test_format_options_normalised():
    f = F.check_formats(True, np.float32, "stochastic", np.uint64(2**64 - 1))
    assert f == F.Formats(True, "float32", "stochastic", 2**64 - 1) and f.stochastic
    assert f.as_dict() == {
        "master_weights": True,
        "state_dtype": "float32",
        "rounding": "stochastic",
        "seed": 2**64 - 1,
    }
    assert type(f.seed) is int
    assert F.check_formats() == F.Formats(False, None, "nearest", 0)


# ------------------------------------------------------------ per-parameter decisions
def test_rules_declare_signed_streams():
    want = {
        "adam": (True, False, False),
        "sgd": (True,),
        "adagrad": (False,),
        "rmsprop": (False, True, True),
        "adamax": (True, False),
        "nadam": (True, False),
        "radam": (True, False),
        "lion": (True,),
    }
    assert {k: r.signed for k, r in RULES.items()} == want


def _pf(dtype, numel=5000, rule="adam", **kw):
    return F.param_format(RULES[rule], dtype, numel, F.check_formats(**kw), "params[0]")


def test_param_format_table():
    N, B, H = F.FMT_NATIVE, F.FMT_BF16, F.FMT_F16
    S, U = F.FMT_Q8_SIGNED, F.FMT_Q8_UNSIGNED
    assert _pf("float32") == (N, (N, N, N), False, "float32")
    assert _pf("float32").native and _pf("float64").native
    assert _pf("float64") == (N, (N, N, N), False, "float64")
    assert _pf("float64", state_dtype="float64") == _pf("float64")
    assert _pf("bfloat16") == (B, (B, B, B), False, "float32")  # as torch: the param's
    assert _pf("float16") == (H, (H, H, H), False, "float32")
    assert _pf("float16", master_weights=True) == (H, (N, N, N), True, "float32")
    assert _pf("float32", master_weights=True) == (N, (N, N, N), False, "float32")
    assert _pf("float16", state_dtype="bfloat16") == (H, (B, B, B), False, "float32")
    assert _pf("bfloat16", state_dtype="float32") == (B, (N, N, N), False, "float32")
    assert _pf("float32", state_dtype="8bit") == (N, (S, U, U), False, "float32")
    assert _pf("float32", 4095, state_dtype="8bit") == (N, (N, N, N), False, "float32")
    assert _pf("bfloat16", 4095, state_dtype="8bit") == (B, (N, N, N), False, "float32")
    assert _pf("bfloat16", 4096, "rmsprop", state_dtype="8bit", master_weights=True) == (
        B,
        (U, S, S),
        True,
        "float32",
    )
    assert not _pf("float32", state_dtype="bfloat16").native


@pytest.mark.parametrize(
    "dtype, kw",
    [
        ("float64", dict(state_dtype="8bit")),
        ("float64", dict(state_dtype="bfloat16")),
        ("float64", dict(state_dtype="float32")),
        ("float32", dict(state_dtype="float64")),
        ("int64", {}),
        ("float128", {}),
    ],
)
def test_param_format_refused_names_the_parameter(dtype, kw):
    with pytest.raises(TypeError, match=r"params\[0\]"):
        _pf(dtype, **kw)


def test_master_weights_need_a_16_bit_parameter():
    f = F.check_formats(master_weights=True)
    F.check_master_needed(f, ["float32", "bfloat16"])
    F.check_master_needed(F.check_formats(), ["float32"])
    with pytest.raises(ValueError, match="master_weights=True needs float16 or bfloat16"):
        F.check_master_needed(f, ["float32", "float64"])


def test_state_layout():
    pf = _pf("bfloat16", 600, state_dtype="8bit", master_weights=True)  # < 4096: float32
    assert F.state_layout(RULES["adam"], pf, (20, 30), ema=True) == {
        "exp_avg": ("float32", (20, 30)),
        "exp_avg_sq": ("float32", (20, 30)),
        "max_exp_avg_sq": ("float32", (20, 30)),
        "master_param": ("float32", (20, 30)),
        "param_ema": ("float32", (20, 30)),
    }
    pf = _pf("float32", 4097, state_dtype="8bit")
    assert F.state_layout(RULES["adam"], pf, (4097,), names=("exp_avg", "exp_avg_sq")) == {
        "exp_avg": ("uint8", (4097,)),
        "exp_avg_absmax": ("float32", (17,)),
        "exp_avg_sq": ("uint8", (4097,)),
        "exp_avg_sq_absmax": ("float32", (17,)),
    }
    pf = _pf("float16", 10, "sgd")
    assert F.state_layout(RULES["sgd"], pf, (10,)) == {"momentum_buffer": ("float16", (10,))}


# ================================================================= the optimizers
RULE_CASES = {  # options that use every state stream of the rule
    "adam": (fastadam.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
    "sgd": (fastadam.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adagrad": (fastadam.Adagrad, dict(lr=5e-2, initial_accumulator_value=0.1)),
    "rmsprop": (fastadam.RMSprop, dict(lr=1e-3, momentum=0.9, centered=True)),
    "adamax": (fastadam.Adamax, dict(lr=1e-2)),
    "nadam": (fastadam.NAdam, dict(lr=1e-2)),
    "radam": (fastadam.RAdam, dict(lr=1e-2)),
    "lion": (fastadam.Lion, dict(lr=1e-3, weight_decay=0.1)),
}
assert set(RULE_CASES) == set(RULES)
HALVES = ["float16", "bfloat16"]


def _dtype(name):
    """The NumPy dtype of a name; bfloat16 tests skip without ml_dtypes."""
    if name == "bfloat16":
        return np.dtype(
            pytest.importorskip("ml_dtypes", reason="NumPy bfloat16 needs ml_dtypes").bfloat16
        )
    return np.dtype(name)


def _same(a, b):
    """Bitwise equality (NaNs included) of two arrays of the same dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _bits16(a):
    return np.ascontiguousarray(a).view(np.uint16)


def _neighbours(x, dt):
    """(lo, hi) uint16 bit patterns of the 16-bit values of dtype dt around float32 x (equal
    where x is exactly representable): what stochastic rounding may give."""
    x = np.asarray(x, np.float32)
    r = x.astype(dt)
    bits = _bits16(r).astype(np.int32)
    w = r.astype(np.float32)
    away = np.abs(x) > np.abs(w)  # the other neighbour is one ulp further from zero
    other = np.where(w == x, bits, np.where(away, bits + 1, bits - 1))
    return bits.astype(np.uint16), other.astype(np.uint16)


def _quadratic(rng, shapes):
    """A separable quadratic 0.5 * sum(c * (p - t)**2): its targets, curvatures, gradient."""
    ts = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    cs = [rng.uniform(0.5, 2.0, s).astype(np.float32) for s in shapes]

    def grads(params):
        return [
            (c * (np.asarray(p, np.float32) - t)).astype(np.float32)
            for p, c, t in zip(params, cs, ts)
        ]

    def loss(params):
        return sum(
            float(0.5 * np.sum(c.astype(np.float64) * (np.asarray(p, np.float64) - t) ** 2))
            for p, c, t in zip(params, cs, ts)
        )

    return grads, loss


def _snapshot(opt, params):
    sd = copy.deepcopy(opt.state_dict())
    return [np.asarray(p).tobytes() for p in params], sd


def _unchanged(opt, params, snap):
    bufs, sd = snap
    assert [np.asarray(p).tobytes() for p in params] == bufs
    now = opt.state_dict()
    assert now["step_count"] == sd["step_count"]
    assert now["state"].keys() == sd["state"].keys()
    for i, e in sd["state"].items():
        for k, v in e.items():
            assert (
                _same(now["state"][i][k], v)
                if isinstance(v, np.ndarray)
                else now["state"][i][k] == v
            )


# ------------------------------------------------ (a) master weights = float32 trajectory
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_master_follows_the_float32_trajectory(rule, half, rounding):
    dt = _dtype(half)
    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(11)
    shapes = [(33, 7), (4100,), (3,)]
    p16 = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes[:2]]
    p16.append(rng.standard_normal(shapes[2]).astype(np.float32))  # float32: its own master
    ref = [p.astype(np.float32) for p in p16]  # the widened copies
    opt = cls(p16, master_weights=True, rounding=rounding, seed=7, **kw)
    opt_ref = cls(ref, **kw)
    not_nearest = 0
    for t in range(5):
        g16 = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes[:2]]
        g16.append(rng.standard_normal(shapes[2]).astype(np.float32))
        opt.step(g16)
        opt_ref.step([g.astype(np.float32) for g in g16])
        for i in range(2):
            m = opt.state[i]["master_param"]
            assert m.dtype == np.float32 and _same(m, ref[i]), (t, i)
            lo, hi = _neighbours(ref[i], dt)
            got = _bits16(p16[i])
            if rounding == "nearest":
                assert np.array_equal(got, lo), (t, i)
            else:
                assert np.all((got == lo) | (got == hi)), (t, i)
                not_nearest += int(np.sum(got != lo))
        assert _same(p16[2], ref[2])
        for i in range(3):  # master weights: float32 state, the float32 run's bit for bit
            for k in RULES[rule].state:
                if k in opt_ref.state[i]:
                    assert _same(opt.state[i][k], opt_ref.state[i][k]), (t, i, k)
    if rounding == "stochastic":
        assert not_nearest > 100  # it is not nearest rounding in disguise
    assert "master_param" not in opt.state[2]


def test_master_starts_from_the_parameter_as_of_its_first_step():
    dt = np.dtype(np.float16)
    p = np.zeros(10, dt)
    q = np.zeros(3, dt)
    opt = fastadam.Adam([p, q], master_weights=True, lr=0.1)
    p[...] = np.arange(10)  # written after the optimizer was made, before any step
    opt.step([np.ones(10, dt), None])
    ref = np.arange(10, dtype=np.float32)
    fastadam.Adam([ref], lr=0.1).step([np.ones(10, np.float32)])
    assert _same(opt.state[0]["master_param"], ref) and _same(p, ref.astype(dt))
    q[...] = 5  # q has not stepped: its master follows it still
    opt.step([None, np.ones(3, dt)])
    assert np.all(opt.state[1]["master_param"] < 5) and np.all(q < 5)
    p[...] = 100  # after its first step the master is the truth
    opt.step([np.zeros(10, dt), None])
    assert np.all(p < 10)


# ------------------------------------------------------------- (b) 8-bit state
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_8bit_state_layout_and_training(rule):
    from fastadam.reference import formats as ref

    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(5)
    shapes = [(64, 80), (4095,), (4096,), (10,)]
    params = [np.zeros(s, np.float32) for s in shapes]
    grads, loss = _quadratic(rng, shapes)
    opt = cls(params, state_dtype="8bit", **kw)
    names = RULES[rule].needs(RULES[rule].check(opt.param_groups[0]))
    assert names
    for i, p in enumerate(params):
        st = opt.state[i]
        for k, signed in zip(RULES[rule].state, RULES[rule].signed):
            if k not in names:
                continue
            if p.size >= 4096:
                assert st[k].dtype == np.uint8 and st[k].shape == p.shape
                a = st[k + "_absmax"]
                assert a.dtype == np.float32 and a.shape == (-(-p.size // 256),)
                start = np.float32(RULES[rule].initial(k, opt._rule.check(opt.param_groups[0])))
                assert np.all(ref.dequantize_blockwise(st[k], a, signed) == start)
            else:
                assert st[k].dtype == np.float32 and st[k].shape == p.shape
                assert k + "_absmax" not in st
    sd = opt.state_dict()
    assert sd["formats"] == {
        "master_weights": False,
        "state_dtype": "8bit",
        "rounding": "nearest",
        "seed": 0,
    }
    before = loss(params)
    for _ in range(30):
        opt.step(grads(params))
    after = loss(params)
    assert np.isfinite(after) and after < 0.98 * before, (before, after)
    sd = opt.state_dict()
    for k in names:
        assert sd["state"][0][k].dtype == np.uint8
        assert sd["state"][0][k + "_absmax"].dtype == np.float32
        assert sd["state"][1][k].dtype == np.float32


# --------------------------------------------------- (c) bfloat16 state, float32 params
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_bfloat16_state_on_float32_params(rule, rounding):
    bf16 = _dtype("bfloat16")
    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(6)
    shapes = [(40, 30), (7,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ref = [p.copy() for p in params]
    grads, loss = _quadratic(rng, shapes)
    opt = cls(params, state_dtype=np.dtype(bf16), rounding=rounding, **kw)
    if "initial_accumulator_value" in kw:  # the initial value is stored rounded (nearest)
        kw = dict(
            kw,
            initial_accumulator_value=float(
                np.float32(kw["initial_accumulator_value"]).astype(bf16)
            ),
        )
    opt_ref = cls(ref, **kw)
    g = grads(params)
    opt.step(g)
    opt_ref.step(g)
    # the first step's moments are computed from zero (or the initial value) alike; the
    # parameter is updated from them in float32, only the stored moments are rounded
    for i in range(2):
        assert _same(params[i], ref[i])
        for k in opt_ref.state[i]:
            if k in RULES[rule].state:
                got = opt.state[i][k]
                assert got.dtype == bf16
                lo, hi = _neighbours(opt_ref.state[i][k], bf16)
                if rounding == "nearest":
                    assert np.array_equal(_bits16(got), lo), k
                else:
                    assert np.all((_bits16(got) == lo) | (_bits16(got) == hi)), k
    before = loss(params)
    for _ in range(30):
        opt.step(grads(params))
    assert loss(params) < 0.98 * before


def test_bfloat16_state_without_ml_dtypes_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    with pytest.raises(ImportError, match="state_dtype=bfloat16 needs the ml_dtypes package"):
        fastadam.Adam([np.zeros(4, np.float32)], state_dtype="bfloat16")
    fastadam.Adam([np.zeros(4, np.float32)], state_dtype="8bit")  # does not need it


# ------------------------------------------- (d) float32 gradients of 16-bit parameters
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("half", HALVES)
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_float32_grads_of_16_bit_params(rule, half, master):
    dt = _dtype(half)
    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(8)
    shapes = [(50, 90), (5,)]
    a = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes]
    b = [p.copy() for p in a]
    oa = cls(a, master_weights=master, rounding="stochastic", **kw)
    ob = cls(b, master_weights=master, rounding="stochastic", **kw)
    for _ in range(3):
        g = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes]
        oa.step(g)
        ob.step([x.astype(np.float32) for x in g])  # exactly representable: same bits
    for i in range(2):
        assert _same(a[i], b[i])
        for k, v in oa.state[i].items():
            assert _same(v, ob.state[i][k]) if isinstance(v, np.ndarray) else v == ob.state[i][k]


# -------------------------------------------------------- (e) state_dict round trips
FORMAT_CASES = [  # (param dtype, options)
    ("bfloat16", dict(master_weights=True)),
    ("bfloat16", dict(master_weights=True, rounding="stochastic", seed=2**64 - 1)),
    ("bfloat16", dict(rounding="stochastic", seed=3)),
    ("float16", dict()),
    ("float16", dict(state_dtype="8bit", rounding="stochastic")),
    ("bfloat16", dict(master_weights=True, state_dtype="8bit", rounding="stochastic")),
    ("float16", dict(master_weights=True, state_dtype="bfloat16", rounding="stochastic")),
    ("float32", dict(state_dtype="bfloat16", rounding="stochastic", seed=5)),
    ("float32", dict(state_dtype="8bit")),
]


@pytest.mark.parametrize("case", range(len(FORMAT_CASES)))
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_state_dict_round_trip_continues_bit_for_bit(rule, case):
    dname, fkw = FORMAT_CASES[case]
    dt = _dtype(dname)
    if fkw.get("state_dtype") == "bfloat16":
        _dtype("bfloat16")  # skips without ml_dtypes
    cls, kw = RULE_CASES[rule]
    kw = dict(kw, ema_decay=0.9, **fkw)
    rng = np.random.default_rng(9)
    shapes = [(70, 64), (3, 5)]
    params = [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes]
    grads = [
        [rng.standard_normal(s).astype(np.float32).astype(dt) for s in shapes] for _ in range(7)
    ]
    opt = cls(params, **kw)
    for g in grads[:4]:
        opt.step(g)
    sd = copy.deepcopy(opt.state_dict())
    saved = [p.copy() for p in params]
    for g in grads[4:]:
        opt.step(g)
    # the saved layout (docs/formats.md): formats, and every key in its dtype
    assert (
        sd["formats"] == fastadam._formats.check_formats(**{k: v for k, v in fkw.items()}).as_dict()
    )
    pf = fastadam._formats.param_format(RULES[rule], dname, 70 * 64, opt._formats, "p")
    e = sd["state"][0]
    layout = fastadam._formats.state_layout(
        RULES[rule],
        pf,
        (70, 64),
        ema=True,
        names=RULES[rule].needs(RULES[rule].check(opt.param_groups[0])),
    )
    for k, (want, shape) in layout.items():
        assert e[k].dtype.name == want and e[k].shape == shape, k
    extra = {"step", "param_ema_step", "mu_product"}
    assert set(e) - extra == set(layout)
    # a fresh optimizer over the saved parameters, loaded, continues bit for bit
    params2 = [p.copy() for p in saved]
    opt2 = cls(params2, **kw)
    opt2.load_state_dict(sd)
    for g in grads[4:]:
        opt2.step(g)
    for a, b in zip(params, params2):
        assert _same(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert (
                _same(v, s2["state"][i][k]) if isinstance(v, np.ndarray) else v == s2["state"][i][k]
            ), (i, k)
    for a, b in zip(opt.averaged_params(), opt2.averaged_params()):
        assert _same(a, b)


def test_state_dict_formats_must_match():
    bf16 = _dtype("bfloat16")
    p = np.ones(5000, bf16)
    opt = fastadam.Adam([p], master_weights=True, state_dtype="8bit", rounding="stochastic")
    opt.step([np.ones(5000, bf16)])
    sd = opt.state_dict()
    for other in (
        dict(master_weights=True, state_dtype="8bit"),
        dict(master_weights=True, state_dtype="8bit", rounding="stochastic", seed=1),
        dict(state_dtype="8bit", rounding="stochastic"),
        dict(master_weights=True, rounding="stochastic"),
    ):
        q = np.ones(5000, bf16)
        o2 = fastadam.Adam([q], **other)
        o2.step([np.full(5000, 2, bf16)])
        snap = _snapshot(o2, [q])
        with pytest.raises(ValueError, match=r"state_dict\['formats'\] differs"):
            o2.load_state_dict(sd)
        _unchanged(o2, [q], snap)
    # without 'formats' (saved by an older fastadam): the defaults
    f32 = np.ones(3, np.float32)
    o3 = fastadam.Adam([f32])
    o3.step([np.ones(3, np.float32)])
    old = o3.state_dict()
    del old["formats"]
    o3.load_state_dict(old)
    with pytest.raises(ValueError, match="state_dtype"):
        fastadam.Adam([np.ones(3, np.float32)], state_dtype="bfloat16").load_state_dict(old)
    bad = dict(sd, formats=dict(sd["formats"], rounding="up"))
    with pytest.raises(ValueError, match=r"state_dict\['formats'\]: rounding"):
        opt.load_state_dict(bad)
    bad = dict(sd, formats=dict(sd["formats"], extra=1))
    with pytest.raises(ValueError, match="unknown keys"):
        opt.load_state_dict(bad)


def test_load_state_dict_checks_each_format():
    bf16 = _dtype("bfloat16")
    p = np.ones(5000, bf16)
    opt = fastadam.Adam([p], master_weights=True, state_dtype="8bit")
    opt.step([np.ones(5000, bf16)])
    sd = opt.state_dict()
    snap = _snapshot(opt, [p])
    e = sd["state"][0]
    for key, value, match in [
        ("exp_avg", e["exp_avg"].astype(np.float32), r"\['exp_avg'\] must have .*uint8"),
        ("exp_avg_absmax", e["exp_avg_absmax"][:-1], r"exp_avg_absmax.*\(20,\)"),
        ("exp_avg_absmax", None, "missing"),
        ("master_param", e["master_param"].astype(bf16), "master_param.*float32"),
        ("master_param", None, "missing"),
        ("exp_avg_sq", None, "missing"),
        ("bogus", np.zeros(3), "unknown keys"),
    ]:
        bad = copy.deepcopy(sd)
        if value is None:
            del bad["state"][0][key]
        else:
            bad["state"][0][key] = value
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        _unchanged(opt, [p], snap)


# ------------------------------------------------------------------- (f) bad input
def test_bad_format_options_change_nothing():
    bf16 = _dtype("bfloat16")
    f32 = np.ones(10, np.float32)
    f64 = np.ones(10, np.float64)
    b = np.ones(10, bf16)
    for args, kw, exc, match in [
        (
            [f32],
            dict(master_weights=True),
            ValueError,
            "master_weights=True needs float16 or bfloat16",
        ),
        ([f64], dict(master_weights=True), ValueError, "master_weights=True needs"),
        ([f32], dict(state_dtype="float16"), ValueError, "state_dtype"),
        ([f32], dict(state_dtype="fp8"), ValueError, "state_dtype"),
        ([f32], dict(state_dtype=8), TypeError, "state_dtype"),
        ([f64], dict(state_dtype="8bit"), TypeError, r"params\[0\]"),
        ([f64], dict(state_dtype=bf16), TypeError, r"params\[0\]"),
        ([b], dict(rounding="up"), ValueError, "rounding"),
        ([b], dict(seed=-1), ValueError, "seed"),
        ([b], dict(seed=2**64), ValueError, "seed"),
        ([b], dict(seed=0.5), TypeError, "seed"),
        ([f32, f64], {}, TypeError, r"params\[1\]"),
        ([b, f64], {}, TypeError, r"params\[1\]"),
        ([np.ones(3, ">f2")], {}, TypeError, r"params\[0\]"),
    ]:
        before = [a.tobytes() for a in args]
        for cls in (fastadam.Adam, fastadam.SGD, fastadam.Lion):
            with pytest.raises(exc, match=match):
                cls(args, **kw)
        assert [a.tobytes() for a in args] == before


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_wrong_gradient_dtype_names_the_argument_and_changes_nothing(rule):
    bf16 = _dtype("bfloat16")
    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(2)
    b = rng.standard_normal(300).astype(bf16)
    h = rng.standard_normal(300).astype(np.float16)
    f = rng.standard_normal(300).astype(np.float32)
    params = [b, h, f]
    for master in (False, True):
        opt = cls(params, master_weights=master, **kw)
        good = [np.ones(300, bf16), np.ones(300, np.float16), np.ones(300, np.float32)]
        opt.step(good)
        snap = _snapshot(opt, params)
        for i, wrong in [
            (0, np.ones(300, np.float16)),
            (1, np.ones(300, bf16)),
            (0, np.ones(300, np.float64)),
            (2, np.ones(300, bf16)),
            (2, np.ones(300, np.float16)),
            (1, np.ones(301, np.float16)),
        ]:
            g = list(good)
            g[i] = wrong
            with pytest.raises((TypeError, ValueError), match=rf"grads?\[{i}\]|params\[{i}\]"):
                opt.step(g)
            _unchanged(opt, params, snap)


# ------------------------------------------------- (g) clipping and non-finite gradients
@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_clipping_bfloat16_grads_equals_float32(rule):
    bf16 = _dtype("bfloat16")
    cls, kw = RULE_CASES[rule]
    rng = np.random.default_rng(4)
    shapes = [(100, 50), (9,)]
    p = [rng.standard_normal(s).astype(bf16) for s in shapes]
    ref = [x.astype(np.float32) for x in p]
    opt = cls(p, master_weights=True, max_grad_norm=0.5, **kw)
    opt_ref = cls(ref, max_grad_norm=0.5, **kw)
    for _ in range(3):
        g = [(3 * rng.standard_normal(s)).astype(bf16) for s in shapes]
        assert opt.step(g) and opt_ref.step([x.astype(np.float32) for x in g])
        assert opt.last_grad_norm == opt_ref.last_grad_norm > 0.5
        for i in range(2):
            assert _same(opt.state[i]["master_param"], ref[i])


@pytest.mark.parametrize("half", HALVES)
def test_skip_nonfinite_16_bit_grads(half):
    dt = _dtype(half)
    p = np.ones((50, 100), dt)
    opt = fastadam.Adam([p], master_weights=True, skip_nonfinite=True)
    assert opt.step([np.ones((50, 100), dt)])
    snap = _snapshot(opt, [p])
    g = np.ones((50, 100), dt)
    g[3, 7] = np.inf
    assert opt.step([g]) is False
    _unchanged(opt, [p], snap)
    g[3, 7] = np.nan
    assert opt.step([g]) is False
    _unchanged(opt, [p], snap)


@pytest.mark.parametrize("half", HALVES)
def test_clip_grad_norm_of_16_bit_grads(half):
    dt = _dtype(half)
    rng = np.random.default_rng(3)
    g = [rng.standard_normal(s).astype(dt) for s in [(300,), (20, 20)]]
    wide = [x.astype(np.float32) for x in g]
    norm = fastadam.clip_grad_norm_(g, 1.0)
    assert norm == fastadam.clip_grad_norm_(wide, 1e30)
    after = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g))
    assert after < 1.01 and all(x.dtype == dt for x in g)


# --------------------------------------------------------------- averages, views
@pytest.mark.parametrize("half", HALVES)
def test_averaged_params_of_16_bit_params_are_float32(half):
    dt = _dtype(half)
    rng = np.random.default_rng(12)
    p = rng.standard_normal(64).astype(dt)
    ref = p.astype(np.float32)
    opt = fastadam.Adam([p], master_weights=True, ema_decay=0.9)
    opt_ref = fastadam.Adam([ref], ema_decay=0.9)
    (avg,) = opt.averaged_params()
    assert _same(avg, ref)  # nothing averaged yet: the master
    for _ in range(4):
        g = rng.standard_normal(64).astype(dt)
        opt.step([g])
        opt_ref.step([g.astype(np.float32)])
    assert opt.state[0]["param_ema"].dtype == np.float32
    (avg,), (avg_ref,) = opt.averaged_params(), opt_ref.averaged_params()
    assert avg.dtype == np.float32 and _same(avg, avg_ref)
    q = rng.standard_normal(64).astype(dt)  # without master weights: float32 too
    o2 = fastadam.Adam([q], ema_decay=0.9)
    assert o2.averaged_params()[0].dtype == np.float32
    o2.step([np.ones(64, dt)])
    assert o2.averaged_params()[0].dtype == np.float32


def test_format_properties_and_state_view():
    bf16 = _dtype("bfloat16")
    p = np.ones(5000, bf16)
    opt = fastadam.AdamW(
        [p], master_weights=True, state_dtype="8bit", rounding="stochastic", seed=12
    )
    assert (opt.master_weights, opt.state_dtype, opt.rounding, opt.seed) == (
        True,
        "8bit",
        "stochastic",
        12,
    )
    st = opt.state[0]
    assert sorted(st) == [
        "exp_avg",
        "exp_avg_absmax",
        "exp_avg_sq",
        "exp_avg_sq_absmax",
        "master_param",
        "step",
    ]
    assert fastadam.Adam([np.ones(3, bf16)]).state[0]["exp_avg"].dtype == bf16
