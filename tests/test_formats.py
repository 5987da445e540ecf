"""Storage formats (docs/formats.md) against their specification, fastadam.reference.formats.

The C core's 16-bit rounding (nearest and stochastic), 8-bit blockwise quantization and
the formatted step of every rule must equal the reference bit for bit, on every SIMD path
and thread count (threads cut blocks of a few hundred elements, so 8-bit blocks and tiles
are cut too). Plus the properties the specification promises: nearest rounding is
numpy's / ml_dtypes' rounding, stochastic rounding picks one of the two neighbours and is
unbiased, 8-bit round trips stay within the map's resolution, the random bits do not
depend on how the work is split.
"""

import os

import numpy as np
import pytest
from test_rules import CASE_IDS, CASES, RULES, _ref_state, _ref_step

from fastadam import _core, _rules
from fastadam.reference import formats as F

FMT = {
    "f32": _core.FMT_NATIVE,
    "bf16": _core.FMT_BF16,
    "f16": _core.FMT_F16,
    "q8s": _core.FMT_Q8_SIGNED,
    "q8u": _core.FMT_Q8_UNSIGNED,
}
SIZES = [1, 17, 0, 1153, 4099, 5, 700]
STEPS = 6

# (param storage, grad storage, master weights, state storage: "q8" = signed/unsigned map
# by stream, stochastic rounding)
LAYOUTS = {
    "bf16": ("bf16", "bf16", False, "bf16", False),
    "bf16-sr": ("bf16", "bf16", False, "bf16", True),
    "f16-f32grad-sr": ("f16", "f32", False, "f16", True),
    "bf16-master": ("bf16", "bf16", True, "f32", False),
    "f16-master-q8-sr": ("f16", "f16", True, "q8", True),
    "bf16-master-bf16-sr": ("bf16", "f32", True, "bf16", True),
    "f32-q8": ("f32", "f32", False, "q8", False),
    "f32-bf16": ("f32", "f32", False, "bf16", False),
}


def _store(fmt, x32):
    """float32 values in storage form (and their absmax for 8-bit)."""
    if fmt == "f32":
        return x32.astype(np.float32), None
    if fmt in ("bf16", "f16"):
        return F.round_bits(fmt, x32), None
    return F.quantize_blockwise(x32, fmt == "q8s")


def _setup(rule, kw, layout, seed=3):
    pf, gf, master, sf, _ = LAYOUTS[layout]
    signed = _rules.RULES[rule].signed
    rng = np.random.default_rng(seed)
    blocks = []
    for n in SIZES:
        p32 = rng.standard_normal(n).astype(np.float32)
        if pf != "f32":
            p32 = F.widen(pf, F.round_bits(pf, p32))
        st32 = _ref_state(rule, kw, p32)
        sfmts = []
        for k in range(len(st32)):
            sfmts.append(("q8s" if signed[k] else "q8u") if sf == "q8" else sf)
        states, absmax = [], []
        for s, f in zip(st32, sfmts):
            if s is None:
                states.append(None)
                absmax.append(None)
            else:
                a, m = _store(f, s)
                states.append(a)
                absmax.append(m)
        blocks.append(
            dict(
                param=_store(pf, p32)[0],
                master=p32.copy() if master else None,
                states=states,
                absmax=absmax,
                sfmts=sfmts,
                ema=np.zeros(n, np.float32),
                formats={"param": pf, "grad": gf, "states": sfmts},
            )
        )
    grads = []
    for _ in range(STEPS):
        gs = []
        for n in SIZES:
            g = rng.standard_normal(n).astype(np.float32)
            gs.append(_store(gf, g)[0] if gf != "f32" else g)
        grads.append(gs)
    return blocks, grads


def _copy(blocks):
    return [
        dict(
            b,
            param=b["param"].copy(),
            master=None if b["master"] is None else b["master"].copy(),
            states=[None if s is None else s.copy() for s in b["states"]],
            absmax=[None if a is None else a.copy() for a in b["absmax"]],
            ema=b["ema"].copy(),
        )
        for b in blocks
    ]


def _plan(rule, kw, blocks, stochastic, seed):
    r = _rules.RULES[rule]
    names = tuple(RULES[rule][2])
    nstate = len(names)
    states, absmaxes, formats = [], [], []
    for b in blocks:
        st = list(b["states"][:nstate]) + [None] * (nstate - len(b["states"][:nstate]))
        am = list(b["absmax"][:nstate]) + [None] * (nstate - len(b["absmax"][:nstate]))
        sf = list(b["sfmts"][:nstate]) + ["f32"] * (nstate - len(b["sfmts"][:nstate]))
        states.append(tuple(st))
        absmaxes.append(tuple(am))
        formats.append((FMT[b["formats"]["param"]],) + tuple(FMT[f] for f in sf))
    if rule == "adam" and kw.get("amsgrad"):  # max_exp_avg_sq is the third stream
        names = names + ("max_exp_avg_sq",)
        states = [s + (b["states"][2],) for s, b in zip(states, blocks)]
        absmaxes = [a + (b["absmax"][2],) for a, b in zip(absmaxes, blocks)]
        formats = [f + (FMT[b["sfmts"][2]],) for f, b in zip(formats, blocks)]
    n = len(blocks)
    scalars = [np.array(1.0) for _ in range(n)] if r.scalar else None
    plan = _core._Plan(
        r.index,
        names,
        [b["param"] for b in blocks],
        states,
        [b["ema"] for b in blocks],
        [0] * n,
        1,
        formats=formats,
        masters=[b["master"] for b in blocks],
        absmaxes=absmaxes,
        stochastic=stochastic,
        seed=seed,
        indices=list(range(10, 10 + n)),
        scalar_mirrors=scalars,
    )
    o = r.check({**r.defaults, **kw})
    plan.set_options(0, o["lr"], o["weight_decay"], o["maximize"], 0.9, r.c_hyper(o))
    return plan, scalars


def _reference(rule, kw, blocks, grads, stochastic, seed):
    ref = _copy(blocks)
    scalars = [1.0] * len(ref)
    for t, gs in enumerate(grads, 1):
        for i, (b, g) in enumerate(zip(ref, gs)):

            def update(p, g32, s32, i=i, t=t):
                return _ref_step(rule, p, g32, s32, t, kw, scalars[i])

            scalars[i] = F.formatted_step(
                update,
                b["param"],
                g,
                b["states"],
                formats=b["formats"],
                step=t,
                master=b["master"],
                absmax=b["absmax"],
                stochastic=stochastic,
                seed=seed,
                index=10 + i,
                ema=b["ema"],
                ema_decay=0.9,
            )
    return ref, scalars


def _bits(a):
    return None if a is None else np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rule, kw", CASES, ids=CASE_IDS)
def test_formatted_step_equals_reference(isa, rule, kw, layout):
    stochastic = LAYOUTS[layout][4]
    seed = 12345678901234567
    blocks, grads = _setup(rule, kw, layout)
    ref, ref_scalars = _reference(rule, kw, blocks, grads, stochastic, seed)
    for threads in (1, 2, 3):
        got = _copy(blocks)
        plan, scalars = _plan(rule, kw, got, stochastic, seed)
        for gs in grads:
            plan.step(gs, num_threads=threads, chunk=64, isa=isa)
        for i, (b, r) in enumerate(zip(got, ref)):
            where = f"{layout} threads={threads} block {i} (n={SIZES[i]})"
            assert np.array_equal(_bits(b["param"]), _bits(r["param"])), "param " + where
            if b["master"] is not None:
                assert np.array_equal(_bits(b["master"]), _bits(r["master"])), "master " + where
            for k, (s, rs) in enumerate(zip(b["states"], r["states"])):
                assert np.array_equal(_bits(s), _bits(rs)), f"state {k} " + where
            for k, (a, ra) in enumerate(zip(b["absmax"], r["absmax"])):
                assert np.array_equal(_bits(a), _bits(ra)), f"absmax {k} " + where
            assert np.array_equal(_bits(b["ema"]), _bits(r["ema"])), "ema " + where
            if scalars is not None:
                assert float(scalars[i]) == pytest.approx(ref_scalars[i], rel=1e-6)


def test_positive_denominator_never_stores_as_zero(isa):
    """AdaGrad's 8-bit sum (an unsigned stream) after one step is g**2: with one gradient
    of 1 per block and the others 1e-4 (g**2 / absmax = 1e-8, below the unsigned map's
    first threshold), the small ones store as code 1, not the nearest code 0, on every
    path and thread count; zero gradients still store as 0."""
    blocks, _ = _setup("adagrad", {}, "f32-q8")
    grads = []
    for n in SIZES:
        g = np.full(n, 1e-4, np.float32)
        g[::256] = 1.0
        g[3::7] = 0.0
        grads.append(g)
    ref, _ = _reference("adagrad", {}, blocks, [grads], False, 0)
    for b, g in zip(ref, grads):
        if b["sfmts"][0] != "q8u":  # tensors below 4096 elements: float32 (not here: _setup)
            continue
        codes = b["states"][0]
        tiny = (g == np.float32(1e-4)) & (np.repeat(b["absmax"][0], 256)[: g.size] == 1.0)
        assert np.all(codes[tiny] == 1) and np.all(codes[g == 0] == 0)
        assert np.searchsorted(F.UNSIGNED_THRESHOLDS, np.float32(1e-8)) == 0  # nearest: 0
    for threads in (1, 2, 3):
        got = _copy(blocks)
        plan, _ = _plan("adagrad", {}, got, False, 0)
        plan.step(grads, num_threads=threads, chunk=64, isa=isa)
        for b, r in zip(got, ref):
            assert np.array_equal(_bits(b["states"][0]), _bits(r["states"][0]))
            assert np.array_equal(_bits(b["absmax"][0]), _bits(r["absmax"][0]))


# ------------------------------------------------------------------ the specification
def test_nearest_rounding_is_numpy_and_ml_dtypes():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    edges = np.arange(0x33000000, 0x47900000, 4093, dtype=np.uint32)  # float16's range
    u = np.concatenate([u, edges, edges | 0x80000000, np.arange(0, 1 << 20, 7, dtype=np.uint32)])
    x = u.view(np.float32)
    ok = ~np.isnan(x)
    with np.errstate(all="ignore"):
        assert np.array_equal(F.f16_bits(x)[ok], x.astype(np.float16).view(np.uint16)[ok])
    assert np.isnan(F.f16_to_f32(F.f16_bits(x[~ok]))).all()
    ml = pytest.importorskip("ml_dtypes", reason="bfloat16 comparison needs ml_dtypes")
    with np.errstate(all="ignore"):
        assert np.array_equal(F.bf16_bits(x)[ok], x.astype(ml.bfloat16).view(np.uint16)[ok])
    assert np.isnan(F.bf16_to_f32(F.bf16_bits(x[~ok]))).all()


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_stochastic_rounding_neighbours_and_unbiased(fmt):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(4000) * 10.0 ** rng.integers(-6, 4, 4000)).astype(np.float32)
    if fmt == "f16":
        x = np.concatenate([x, np.float32(3e-6) * rng.standard_normal(500).astype(np.float32)])
    lo = F.widen(fmt, F.round_bits(fmt, x, np.zeros(x.size, np.uint32)))  # toward zero
    hi = F.widen(fmt, F.round_bits(fmt, x, np.full(x.size, 0xFFFFFFFF, np.uint32)))
    reps = 400
    acc = np.zeros(x.size, np.float64)
    for r in range(reps):
        bits = F.random_bits(F.stream_key(7, 0, r + 1, 0), 0, x.size)
        y = F.widen(fmt, F.round_bits(fmt, x, bits))
        assert np.all((y == lo) | (y == hi))
        acc += y
    mean = acc / reps
    gap = np.abs(hi.astype(np.float64) - lo)
    exact = gap == 0
    # the mean of reps Bernoulli draws: within 5 standard deviations of x
    p = np.where(exact, 0, (np.abs(x.astype(np.float64)) - np.abs(lo)) / np.where(exact, 1, gap))
    sd = gap * np.sqrt(p * (1 - p) / reps) + 1e-300
    z = np.abs(mean - x) / sd
    assert np.all(z[~exact & (p > 0.01) & (p < 0.99)] < 5.5)
    # and the signed error over everything averages to ~0 relative to the gaps
    rel = ((mean - x) / np.where(exact, 1, gap))[~exact]
    assert abs(rel.mean()) < 0.01


def test_quantize_round_trip_within_resolution():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(256 * 40 + 77) * 10.0 ** rng.integers(-5, 2, 256 * 40 + 77)).astype(
        np.float32
    )
    for signed, m in ((True, F.SIGNED_MAP), (False, F.UNSIGNED_MAP)):
        v = x if signed else np.abs(x)
        codes, absmax = F.quantize_blockwise(v, signed)
        back = F.dequantize_blockwise(codes, absmax, signed)
        scale = np.repeat(absmax, 256)[: v.size]
        q = v / scale
        # unsigned: a positive value below the first threshold stores as code 1, not 0
        floored = (q > 0) & (q < F.UNSIGNED_THRESHOLDS[0]) if not signed else q != q
        assert signed or floored.sum() > 100
        assert np.all(codes[floored] == 1)
        # every other code is the nearest one of the map (ties within float32 rounding)
        dist = np.abs(m[codes] - q)[~floored]
        best = np.min(np.abs(m[None, :] - q[~floored, None]), axis=1)
        assert np.all(dist <= best * (1 + 1e-6) + 1e-12)
        # the error is at most half the gap between the two codes around the value
        j = np.clip(np.searchsorted(m, q), 1, 255)
        half_gap = (m[j] - m[j - 1]) / 2
        assert np.all((np.abs(back - v) <= half_gap * scale * (1 + 1e-5) + 1e-30)[~floored])
    assert np.array_equal(
        F.dequantize_blockwise(*F.quantize_blockwise(np.zeros(300, np.float32), True), True),
        np.zeros(300, np.float32),
    )


def test_maps_are_bitsandbytes_dynamic_maps():
    for m, _signed in ((F.SIGNED_MAP, True), (F.UNSIGNED_MAP, False)):
        assert m.dtype == np.float32 and m.size == 256 and np.all(np.diff(m) > 0)
        assert m[-1] == 1.0 and 0.0 in m
    assert F.SIGNED_MAP[0] < 0 and np.sum(F.SIGNED_MAP < 0) == 127
    assert F.UNSIGNED_MAP[0] == 0 and np.all(F.UNSIGNED_MAP >= 0)
    assert np.isclose(F.SIGNED_MAP[128], 5.5e-7) and np.isclose(F.UNSIGNED_MAP[1], 3.25e-7)
    assert _core.Q8_TABLES_OK


def test_c_header_is_generated_from_the_reference():
    path = os.path.join(os.path.dirname(__file__), "..", "csrc", "formats", "q8_maps.h")
    with open(path) as f:
        assert f.read() == F.c_header(), "regenerate: python -m fastadam.reference.formats"


def test_random_key_matches_the_reference():
    for seed, index, step, stream in (
        (0, 0, 1, 0),
        (2**64 - 1, 5, 123456789, 4),
        (42, 2**40, 3, 2),
    ):
        base = _core.rng_base(seed, index)
        assert _core.stream_key(base, step, stream) == F.stream_key(seed, index, step, stream)


def test_random_bits_do_not_depend_on_the_split():
    key = F.stream_key(1, 2, 3, 0)
    whole = F.random_bits(key, 2**32 - 100, 300)
    parts = np.concatenate([F.random_bits(key, 2**32 - 100, 100), F.random_bits(key, 2**32, 200)])
    assert np.array_equal(whole, parts)
    assert len(np.unique(whole)) == 300


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_grad_stats_of_16bit_grads(isa, fmt):
    rng = np.random.default_rng(4)
    gs = [F.round_bits(fmt, rng.standard_normal(n).astype(np.float32)) for n in (5, 40000, 0, 333)]
    wide = [F.widen(fmt, g) for g in gs]
    ref = _core.grad_stats(wide, 1, isa)
    for threads in (1, 2):
        got = _core.grad_stats(gs, threads, isa, formats=[FMT[fmt]] * len(gs))
        assert got == ref
    gs[1][7] = 0x7C00 if fmt == "f16" else 0x7F80  # +inf
    assert _core.grad_stats(gs, 1, isa, formats=[FMT[fmt]] * len(gs))[1] is True


def test_traffic_moves_every_format():
    p = np.zeros(100_000, np.uint16)
    g = np.ones(100_000, np.uint16)
    m = np.zeros(100_000, np.uint8)
    w = np.zeros(100_000, np.float32)
    _core.traffic([p, g, m, w], 2)
    assert p.view(np.uint8).min() == 1 and m.min() == 1 and w.view(np.uint8).min() == 1
    assert (g == 1).all()
    with pytest.raises(ValueError):
        _core.traffic([p, g[:10]], 1)
