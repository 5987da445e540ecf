"""fastadam.torch with the storage formats of docs/formats.md: float16 and bfloat16
parameters (with or without float32 master weights), bfloat16 and 8-bit blockwise state,
nearest and stochastic rounding.

1. master weights, every rule, bf16 and fp16 parameters (two param groups, fused clipping
   over the 16-bit gradients, ema_decay): after STEPS steps the master and every state
   tensor are the bits of a fastadam.torch float32 optimizer of the same rule on float32
   copies fed the widened gradients, and the parameter is the master rounded to
   nearest-even (``master.to(dtype)``);
2. every rule and format, step by step: the parameter and the stored state are the bits of
   the float32 rule run on the widened (or dequantized) values, rounded once to
   nearest-even (or re-quantized with reference.formats.quantize_blockwise): the
   contract of docs/formats.md written out in torch;
3. bf16 without master weights is close to torch.optim's own bf16 update (a few bf16 ulps;
   why not bitwise: there);
4. the same bits as the NumPy API (ml_dtypes.bfloat16) with stochastic rounding (so the
   random bits' key -- seed, the parameter's index over the groups, step, stream -- is the
   same); stochastic rounding is deterministic, follows the seed and rounds to one of the
   two neighbours;
5. 8-bit state: keys, dtypes, shapes, small tensors kept in float32, a tiny model learns;
6. state_dict: the formats are saved, a resumed run is the uninterrupted one bit for bit
   (stochastic rounding included), mismatches are refused and change nothing;
7. torch.amp.GradScaler with float16 parameters, master weights and loss scaling: overflowing
   steps are skipped (nothing moves) and halve the scale, the master follows the float32
   run given the same scales;
8. ZeroRedundancyOptimizer, 2 ranks, bf16 parameters with master weights == one process;
9. replaced storage is followed; bad input raises before anything changes.
"""

import copy
import io
import json
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")

import fastadam  # noqa: E402
import fastadam.torch as ft  # noqa: E402
from fastadam.reference import formats as fref  # noqa: E402

HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "f16"]
STEPS = 8  # RAdam's rectified update starts at step 6 (beta2 = 0.999)
# every state stream of every rule
CASES = {
    "Adam": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2),
    "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adagrad": dict(lr=1e-2, lr_decay=1e-3, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=1e-3, momentum=0.5, centered=True),
    "Adamax": dict(lr=2e-3, weight_decay=1e-2),
    "NAdam": dict(lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    "RAdam": dict(lr=1e-3, weight_decay=1e-2),
    "Lion": dict(lr=1e-3, weight_decay=1e-2),
}
SHAPES = [(4100,), (7, 9), (3,)]  # 4100 >= 4096: 8-bit; the others keep float32 under "8bit"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small tensors: torch's threads only add contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


def _grads(dtype, steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def _make(rule, params, **kw):
    """The rule over two param groups (the second at half the learning rate)."""
    opts = dict(CASES[rule])
    lr = opts.pop("lr")
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": lr / 2}]
    return getattr(ft, rule)(groups, lr=lr, **opts, **kw)


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _bits(t):
    """The bits of a tensor (16-bit floats as int16, so NaN == NaN and -0 != 0)."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
            if p in opt.state
            else None
            for p in params
        ],
    )


def _same_snapshot(x, y):
    (pa, sa), (pb, sb) = x, y
    return all(_same(a, b) for a, b in zip(pa, pb)) and all(
        (a is None) == (b is None)
        and (a is None or (list(a) == list(b) and all(_same(a[k], b[k]) for k in a)))
        for a, b in zip(sa, sb)
    )


# ------------------------------------------------- 1. master == the float32 trajectory
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("rule", CASES)
def test_master_weights_follow_the_float32_trajectory(rule, dtype):
    ps = _params(dtype)
    qs = [p.detach().float().clone().requires_grad_() for p in ps]
    grads = _grads(dtype)
    kw = dict(ema_decay=0.9, max_grad_norm=20.0)  # the norm is about 64: clipped each step
    opt = _make(rule, ps, master_weights=True, **kw)
    f32 = _make(rule, qs, **kw)
    _run(opt, ps, grads)
    _run(f32, qs, [[g.float() for g in gs] for gs in grads])
    assert opt.last_grad_norm == f32.last_grad_norm > 20.0
    for p, q in zip(ps, qs):
        s, r = opt.state[p], f32.state[q]
        assert _same(s["master_param"], q.detach())
        assert _same(p.detach(), s["master_param"].to(dtype))  # round to nearest-even
        assert set(s) == set(r) | {"master_param"}
        for k, v in r.items():  # float32 moments, the counts, param_ema, mu_product
            assert _same(s[k], v), k
    assert opt.formats == dict(master_weights=True, state_dtype=None, rounding="nearest", seed=0)
    # the averages of 16-bit parameters are float32, those of the master
    for a, b in zip(opt.averaged_params(), f32.averaged_params()):
        assert _same(a, b)


# ---------------------------------------------- 2. every format, step by step, bitwise
FORMATS = {  # parameter dtype, format options
    "bf16": (torch.bfloat16, {}),  # bf16 moments (the parameter's dtype)
    "f16": (torch.float16, {}),  # float16 moments
    "bf16-f32state": (torch.bfloat16, dict(state_dtype="float32")),
    "f32-bf16state": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "f32-8bit": (torch.float32, dict(state_dtype="8bit")),
    "bf16-master-8bit": (torch.bfloat16, dict(master_weights=True, state_dtype="8bit")),
    "f16-master-bf16state": (torch.float16, dict(master_weights=True, state_dtype="bfloat16")),
}


def _signed(rule):
    r = getattr(ft, rule)._rule
    return dict(zip(r.state, r.signed))


def _widen(s, k, signed):
    """State stream k of s as the float32 values the kernel loads."""
    t = s[k]
    if t.dtype == torch.uint8:
        x = fref.dequantize_blockwise(t.numpy(), s[k + "_absmax"].numpy(), signed[k])
        return torch.from_numpy(x).reshape(t.shape)
    return t.float()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rule", CASES)
def test_every_format_is_the_float32_rule_rounded_once(rule, fmt):
    """Each step: load (widen 16-bit values exactly, dequantize 8-bit codes), run the
    float32 rule (a fastadam.torch float32 optimizer whose parameters and state are set
    to those values), store (round to nearest-even; re-quantize the float32 moments; the
    parameter is updated from the float32 moments, not their stored images)."""
    dtype, kw = FORMATS[fmt]
    signed = _signed(rule)
    ps = _params(dtype)
    qs = [p.detach().float().clone().requires_grad_() for p in ps]
    opt = _make(rule, ps, **kw)
    twin = _make(rule, qs)
    eight = False
    for t, gs in enumerate(_grads(dtype)):
        with torch.no_grad():  # load
            for p, q in zip(ps, qs):
                s = opt.state.get(p)
                q.copy_(s["master_param"] if s and "master_param" in s else p.float())
                for k in signed if s else ():
                    if k in s:
                        twin.state[q][k].copy_(_widen(s, k, signed))
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.float()
        opt.step()
        twin.step()
        for p, q in zip(ps, qs):  # store
            s, r = opt.state[p], twin.state[q]
            if "master_param" in s:
                assert _same(s["master_param"], q.detach())
            assert _same(p.detach(), q.detach().to(dtype)), f"step {t}"
            for k, v in r.items():
                if k in signed and s[k].dtype == torch.uint8:
                    eight = True
                    codes, absmax = fref.quantize_blockwise(v.numpy(), signed[k])
                    assert np.array_equal(s[k].numpy().reshape(-1), codes), (k, t)
                    assert np.array_equal(s[k + "_absmax"].numpy(), absmax), (k, t)
                elif k in signed:
                    assert _same(s[k], v.to(s[k].dtype)), (k, t)
                else:  # step, mu_product
                    assert _same(s[k], v), (k, t)
    assert eight == (kw.get("state_dtype") == "8bit")


# ------------------------------------------------------- 3. close to torch.optim's bf16
# torch's fused CPU kernels where they work on bf16 (Adam, AdamW, Adagrad); torch 2.13's
# fused SGD leaves 16-bit parameters unchanged on its vectorised path (every element of a
# 64-element tensor, first step), so SGD is compared with foreach, as the rules torch has
# no fused kernel for. K_ULPS: the bound in bf16 ulps of |p| + t*lr.
TORCH_BF16 = {
    "Adam": ("fused", 1),
    "AdamW": ("fused", 1),
    "Adagrad": ("fused", 4),
    "SGD": ("foreach", 10),
    "RMSprop": ("foreach", 10),
    "Adamax": ("foreach", 10),
    "NAdam": ("foreach", 10),
    "RAdam": ("foreach", 10),
}


@pytest.mark.parametrize("rule", TORCH_BF16)
def test_bf16_without_master_is_close_to_torch(rule):
    """Not bitwise, because the operations differ. Both load bf16 and store each value
    rounded to bf16, but torch's fused kernels compute in float32 with fused multiply-adds
    (lerp, addcmul) and divide where fastadam multiplies by a precomputed reciprocal
    (README, "the numerical contract"): a float32 intermediate an ulp apart flips a bf16
    rounding now and then, and the difference is carried by the moments. foreach runs
    every op in bf16 (each intermediate, e.g. the momentum buffer before the nesterov
    step, rounded to bf16), so it is further from the one rounding per stored value of
    docs/formats.md: up to about 8 ulps after 8 steps (measured: fused 0 ulps for Adam
    and AdamW, 2.6 for Adagrad; foreach up to 8.2, NAdam, over 3 seeds)."""
    mode, k_ulps = TORCH_BF16[rule]
    kw = dict(CASES[rule])
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(4100, generator=g).bfloat16()
    grads = [torch.randn(4100, generator=g).bfloat16() for _ in range(STEPS)]
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    mine = getattr(ft, rule)([a], **kw)
    theirs = getattr(torch.optim, rule)([b], **kw, **{mode: True})
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        mine.step()
        theirs.step()
    assert {k: v.dtype for k, v in mine.state[a].items()} == {
        k: v.dtype for k, v in theirs.state[b].items()
    }  # bf16 moments, as torch's
    A, B = a.detach().float(), b.detach().float()
    ulp = 2.0**-7 * (B.abs() + STEPS * kw["lr"])
    worst = float(((A - B).abs() / ulp).max())
    print(f"{rule}: fastadam vs torch {mode} bf16, max {worst:.3g} ulps of |p| + t*lr")
    assert worst <= k_ulps
    assert float((B - p0.float()).abs().max()) > 10 * STEPS * kw["lr"] * 2.0**-7  # it moved


# ------------------------------------------------ 4. the NumPy API, stochastic rounding
def _to_numpy(t):
    """A copy of a tensor as a NumPy array (bfloat16: ml_dtypes')."""
    import ml_dtypes

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _np_bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[a.itemsize])


@pytest.mark.parametrize(
    "kw",
    [dict(state_dtype="bfloat16"), dict(master_weights=True, state_dtype="8bit")],
    ids=["bf16state", "master-8bit"],
)
@pytest.mark.parametrize("rule", CASES)
def test_same_bits_as_the_numpy_api_with_stochastic_rounding(rule, kw):
    pytest.importorskip("ml_dtypes", reason="ml_dtypes (NumPy bfloat16) is not installed")
    kw = dict(kw, rounding="stochastic", seed=2**64 - 5)
    default = torch.get_default_dtype()
    if rule == "NAdam":  # mu_product is a double in the NumPy API; torch's is its default
        torch.set_default_dtype(torch.float64)
    try:
        ps = _params(torch.bfloat16)
        arrays = [_to_numpy(p) for p in ps]
        grads = _grads(torch.bfloat16)
        opt = _make(rule, ps, **kw)
        opts = dict(CASES[rule])
        lr = opts.pop("lr")
        nopt = getattr(fastadam, rule)(
            [{"params": arrays[:2]}, {"params": arrays[2:], "lr": lr / 2}], lr=lr, **opts, **kw
        )
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            nopt.step([_to_numpy(g) for g in gs])
    finally:
        torch.set_default_dtype(default)
    nsd = nopt.state_dict()
    assert nsd["formats"] == opt.state_dict()["formats"]
    for i, (p, a) in enumerate(zip(ps, arrays)):
        assert np.array_equal(_np_bits(_to_numpy(p)), _np_bits(a)), i
        arrays_of = {k: v for k, v in opt.state[p].items() if v.dim()}  # streams, master
        assert set(arrays_of) == {k for k, v in nsd["state"][i].items() if np.ndim(v)}
        for k, v in arrays_of.items():
            assert np.array_equal(_np_bits(_to_numpy(v)), _np_bits(nsd["state"][i][k])), (i, k)


def _trajectory(rule, dtype, steps=4, **kw):
    ps = _params(dtype)
    opt = _make(rule, ps, **kw)
    _run(opt, ps, _grads(dtype, steps))
    return ps, opt


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_stochastic_rounding_is_deterministic_and_follows_the_seed(dtype):
    a, oa = _trajectory("Adam", dtype, rounding="stochastic", seed=11)
    b, ob = _trajectory("Adam", dtype, rounding="stochastic", seed=11, num_threads=2)
    c, _ = _trajectory("Adam", dtype, rounding="stochastic", seed=12)
    n, _ = _trajectory("Adam", dtype)
    assert _same_snapshot(_snapshot(oa, a), _snapshot(ob, b))
    assert not torch.equal(_bits(a[0]), _bits(c[0]))
    assert not torch.equal(_bits(a[0]), _bits(n[0]))
    assert oa.state[a[0]]["exp_avg"].dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_stochastic_rounding_of_the_master_picks_a_neighbour(dtype):
    ps, opt = _trajectory("AdamW", dtype, master_weights=True, rounding="stochastic")
    for p in ps:
        m = opt.state[p]["master_param"]
        nearest = m.to(dtype)
        up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
        down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf")))
        # the neighbours of m: nearest and the one on m's other side
        other = torch.where(
            nearest.float() < m, up, torch.where(nearest.float() > m, down, nearest)
        )
        got = p.detach()
        assert bool(((got == nearest) | (got == other)).all())
    big = ps[0].detach()
    m = opt.state[ps[0]]["master_param"]
    away = float((big != m.to(dtype)).float().mean())
    assert 0.05 < away < 0.5  # not round-to-nearest: about a quarter rounds the other way


# ------------------------------------------------------------------------ 5. 8-bit
def test_8bit_state_layout():
    big, small = torch.zeros(4096, requires_grad=True), torch.zeros(4095, requires_grad=True)
    half = torch.zeros(64, 80, dtype=torch.bfloat16, requires_grad=True)
    opt = ft.Adam([big, small, half], amsgrad=True, state_dtype="8bit")
    for p in (big, small, half):
        p.grad = torch.linspace(-1, 1, p.numel()).reshape(p.shape).to(p.dtype)
    opt.step()
    layout = {
        p: {k: (v.dtype, tuple(v.shape)) for k, v in opt.state[p].items()}
        for p in (big, small, half)
    }
    f32, u8 = torch.float32, torch.uint8
    assert layout[big] == {
        "step": (f32, ()),
        "exp_avg": (u8, (4096,)),
        "exp_avg_absmax": (f32, (16,)),
        "exp_avg_sq": (u8, (4096,)),
        "exp_avg_sq_absmax": (f32, (16,)),
        "max_exp_avg_sq": (u8, (4096,)),
        "max_exp_avg_sq_absmax": (f32, (16,)),
    }
    assert list(layout[big]) == list(layout[half])  # torch's key order, absmax after each
    assert layout[half]["exp_avg"] == (u8, (64, 80))
    assert layout[half]["exp_avg_absmax"] == (f32, (20,))  # ceil(5120 / 256)
    assert layout[small] == {
        "step": (f32, ()),
        "exp_avg": (f32, (4095,)),
        "exp_avg_sq": (f32, (4095,)),
        "max_exp_avg_sq": (f32, (4095,)),
    }
    sd = opt.state_dict()
    assert sd["formats"]["state_dtype"] == "8bit"
    assert sd["state"][0]["exp_avg_absmax"].dtype == f32


def _mlp_loss(net, x, y):
    return torch.nn.functional.mse_loss(net(x), y)


@pytest.mark.parametrize(
    "kw, dtype",
    [
        (dict(state_dtype="8bit"), torch.float32),
        (dict(master_weights=True, state_dtype="8bit"), torch.bfloat16),
    ],
    ids=["f32", "bf16-master"],
)
def test_8bit_tiny_model_learns(kw, dtype):
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    y = torch.sin(x[:, :8] * 2) + x[:, 8:16] ** 2
    losses = {}
    for name, opts in (("8bit", kw), ("f32", {})):
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)
        )  # 8192 weights: 8-bit moments
        if name == "8bit":
            net = net.to(dtype)
        opt = ft.AdamW(net.parameters(), lr=3e-3, **opts)
        first = None
        for _ in range(150):
            opt.zero_grad()
            loss = _mlp_loss(
                net, x.to(dtype) if name == "8bit" else x, y.to(dtype) if name == "8bit" else y
            )
            loss.backward()
            opt.step()
            first = float(loss.detach()) if first is None else first
        losses[name] = (first, float(loss.detach()))
    (first, last), (_, f32_last) = losses["8bit"], losses["f32"]
    print(f"8-bit AdamW, {dtype}: loss {first:.3f} -> {last:.3f} (float32: {f32_last:.3f})")
    assert last < 0.3 * first
    assert last < 1.5 * f32_last + 0.02


# -------------------------------------------------------------------- 6. state_dict
def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUME = {
    "bf16-stochastic": (
        torch.bfloat16,
        dict(state_dtype="bfloat16", rounding="stochastic", seed=5),
    ),
    "bf16-master-8bit-stochastic": (
        torch.bfloat16,
        dict(master_weights=True, state_dtype="8bit", rounding="stochastic"),
    ),
    "f16-master": (torch.float16, dict(master_weights=True)),
    "f32-8bit": (torch.float32, dict(state_dtype="8bit")),
    "f32-bf16state-stochastic": (
        torch.float32,
        dict(state_dtype="bfloat16", rounding="stochastic", seed=3),
    ),
}


@pytest.mark.parametrize(
    "case, rule",
    [(c, "Adam") for c in RESUME]
    + [("bf16-master-8bit-stochastic", r) for r in CASES if r != "Adam"]
    + [("bf16-stochastic", r) for r in ("NAdam", "SGD", "Adagrad")],
)
def test_resume_from_state_dict_is_bitwise(case, rule):
    dtype, kw = RESUME[case]
    grads = _grads(dtype, 6)
    ps = _params(dtype)
    opt = _make(rule, ps, ema_decay=0.5, **kw)
    _run(opt, ps, grads[:3])
    ckpt = _roundtrip({"params": [p.detach() for p in ps], "opt": opt.state_dict()})
    assert ckpt["opt"]["formats"] == opt.formats
    qs = [t.clone().requires_grad_() for t in ckpt["params"]]
    resumed = _make(rule, qs, ema_decay=0.5, **kw)
    resumed.load_state_dict(ckpt["opt"])
    assert _same_snapshot(_snapshot(resumed, qs), _snapshot(opt, ps))
    _run(opt, ps, grads[3:])
    _run(resumed, qs, grads[3:])
    assert _same_snapshot(_snapshot(resumed, qs), _snapshot(opt, ps))


def test_sgd_keeps_a_step_under_stochastic_rounding():
    """SGD's state holds a step under stochastic rounding (the random bits' key); a
    momentum buffer made when momentum is switched on restarts it: its first step is
    torch's buf = g."""
    p = torch.zeros(300, requires_grad=True)
    opt = ft.SGD([p], lr=0.1, state_dtype="bfloat16", rounding="stochastic")
    g = torch.randn(300).bfloat16().float()  # exact in bfloat16: no rounding to draw
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    assert list(opt.state[p]) == ["step"] and float(opt.state[p]["step"]) == 2
    opt.param_groups[0]["momentum"] = 0.9
    p.grad = g.clone()
    opt.step()
    s = opt.state[p]
    assert float(s["step"]) == 1 and torch.equal(s["momentum_buffer"].float(), g)
    p.grad = g.clone()
    opt.step()
    assert float(s["step"]) == 2 and not torch.equal(s["momentum_buffer"].float(), g)
    assert "step" not in ft.SGD([p], momentum=0.9).state_dict()["state"].get(0, {})


def test_adagrad_master_is_taken_at_the_first_step():
    """Adagrad makes its state in the constructor (as torch): a parameter loaded after
    that, before the first step, is where its master starts."""
    p = torch.zeros(10, dtype=torch.bfloat16, requires_grad=True)
    opt = ft.Adagrad([p], lr=0.1, master_weights=True)
    assert torch.equal(opt.state[p]["master_param"], torch.zeros(10))
    with torch.no_grad():
        p.copy_(torch.arange(10.0))  # e.g. model.load_state_dict after the optimizer
    p.grad = torch.ones(10, dtype=torch.bfloat16)
    opt.step()
    q = torch.arange(10.0, requires_grad=True)
    ref = ft.Adagrad([q], lr=0.1)
    q.grad = torch.ones(10)
    ref.step()
    assert _same(opt.state[p]["master_param"], q.detach())
    with torch.no_grad():
        p.zero_()  # after the first step the master rules: the parameter is rewritten
    p.grad = torch.ones(10, dtype=torch.bfloat16)
    opt.step()
    m = opt.state[p]["master_param"]
    assert _same(p.detach(), m.to(torch.bfloat16)) and float(m[1:].min()) > 0.5


def test_state_dict_layout_is_torchs_with_default_formats():
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    mine, theirs = (
        ft.Adam([p]),
        torch.optim.Adam([p.detach().clone().requires_grad_()], foreach=False),
    )
    for o in (mine, theirs):
        for q in o.param_groups[0]["params"]:
            q.grad = torch.ones(3, dtype=torch.bfloat16)
        o.step()
    sm, st = mine.state_dict(), theirs.state_dict()
    assert list(sm) == list(st) == ["state", "param_groups"]  # no "formats": the defaults
    assert {k: v.dtype for k, v in sm["state"][0].items()} == {
        k: v.dtype for k, v in st["state"][0].items()
    }
    # a torch.optim checkpoint of bf16 parameters loads (the default formats)
    mine.load_state_dict(_roundtrip(st))


def _stepped(rule="Adam", dtype=torch.bfloat16, **kw):
    ps = _params(dtype)
    opt = _make(rule, ps, **kw)
    _run(opt, ps, _grads(dtype, 2))
    return ps, opt


def _refused(opt, ps, sd, exc, match):
    before = _snapshot(opt, ps)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(exc, match=match):
        opt.load_state_dict(sd)
    assert _same_snapshot(_snapshot(opt, ps), before)
    assert [dict(g) for g in opt.param_groups] == groups


def test_load_state_dict_refuses_other_formats_and_bad_entries():
    kw = dict(master_weights=True, state_dtype="8bit", rounding="stochastic", seed=9)
    ps, opt = _stepped(**kw)
    sd = opt.state_dict()
    for other in (
        dict(kw, seed=10),
        dict(kw, rounding="nearest"),
        dict(kw, state_dtype="bfloat16"),
        dict(kw, master_weights=False),
    ):
        qs, o2 = _stepped(**other)
        _refused(o2, qs, copy.deepcopy(sd), ValueError, "formats")
    _plain_ps, plain = _stepped()  # default formats: its state_dict has no "formats"
    _refused(opt, ps, copy.deepcopy(plain.state_dict()), ValueError, "formats")
    bad = [
        (lambda e: e.pop("master_param"), ValueError, r"lacks \['master_param'\]"),
        (
            lambda e: e.__setitem__("master_param", e["master_param"].bfloat16()),
            ValueError,
            "master_param.*float32",
        ),
        (lambda e: e.pop("exp_avg_absmax"), ValueError, r"lacks \['exp_avg_absmax'\]"),
        (
            lambda e: e.__setitem__("exp_avg_absmax", torch.zeros(3)),
            ValueError,
            "exp_avg_absmax.*shape",
        ),
        (lambda e: e.__setitem__("exp_avg", e["exp_avg"].float()), ValueError, "exp_avg.*uint8"),
        (
            lambda e: e.__setitem__("exp_avg_sq", e["exp_avg_sq"][:-1]),
            ValueError,
            "exp_avg_sq.*shape",
        ),
    ]
    for edit, exc, match in bad:
        d = copy.deepcopy(sd)
        edit(d["state"][0])
        _refused(opt, ps, d, exc, match)
    d = copy.deepcopy(sd)
    d["formats"] = "8bit"
    _refused(opt, ps, d, TypeError, "formats")
    d = copy.deepcopy(sd)  # a small tensor's float32 state cannot claim an absmax
    d["state"][1]["exp_avg_absmax"] = torch.zeros(1)
    _refused(opt, ps, d, ValueError, "exp_avg_absmax.*not 8-bit")
    opt.load_state_dict(copy.deepcopy(sd))  # the untouched one still loads
    ps[0].grad = torch.ones(SHAPES[0], dtype=torch.bfloat16)
    opt.step()


def test_pickle_and_deepcopy_keep_the_formats():
    import pickle

    ps, opt = _stepped(master_weights=True, rounding="stochastic", seed=4)
    for make in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        clone = make(opt)
        assert clone.formats == opt.formats
        qs = [p for g in clone.param_groups for p in g["params"]]
        assert _same_snapshot(_snapshot(clone, qs), _snapshot(opt, ps))
        gs = _grads(torch.bfloat16, 1, seed=7)
        _run(clone, qs, gs)
        _run(opt, ps, gs)
        assert _same_snapshot(_snapshot(clone, qs), _snapshot(opt, ps))


# ------------------------------------------------------ 7. GradScaler, float16, masters
def test_grad_scaler_with_float16_parameters_and_master_weights():
    """The classic fp16 recipe: the scale starts at 2**16, where the float16 gradients
    overflow, and backs off by halving; an inf injected later skips one more step."""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    y = torch.randn(32, 4)
    w = [
        (torch.randn(16, 24) / 4).half().requires_grad_(),
        (torch.randn(24, 4) / 5).half().requires_grad_(),
    ]
    ref = [t.detach().float().requires_grad_() for t in w]
    opt = ft.Adam(w, lr=1e-3, master_weights=True)
    f32 = ft.Adam(ref, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    inject = {12}
    scales, skipped = [], []
    for t in range(20):
        opt.zero_grad()
        loss = ((torch.tanh(x.half() @ w[0]) @ w[1] - y.half()).float() ** 2).sum()
        scaler.scale(loss).backward()
        if t in inject:
            w[1].grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        finite = all(bool(torch.isfinite(p.grad).all()) for p in w)
        before = _snapshot(opt, w)
        scaler.step(opt)
        scaler.update()
        scales.append(scale)
        if finite:
            for p, q in zip(w, ref):
                q.grad = p.grad.float()
            f32.step(grad_scale=scale)  # the kernel divides the widened gradient by it
        else:
            skipped.append(t)
            assert _same_snapshot(_snapshot(opt, w), before)  # nothing moved
            assert scaler.get_scale() == scale / 2
    assert skipped[0] == 0 and 12 in skipped  # 2**16 overflows float16 at first
    assert scaler.get_scale() == 2.0**16 / 2 ** len(skipped) and len(skipped) < 10
    assert float(opt.state[w[0]]["step"]) == 20 - len(skipped)
    for p, q in zip(w, ref):
        assert _same(opt.state[p]["master_param"], q.detach())
        assert _same(p.detach(), q.detach().half())
    print(
        f"GradScaler, float16 + master weights: skipped steps {skipped}, scale "
        f"{scales[0]:g} -> {scaler.get_scale():g}"
    )


# ---------------------------------------------------------------------- 8. ZeRO
ZERO_WORKER = textwrap.dedent(r"""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastadam.torch

    rank, world, port, out, steps = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                     sys.argv[4], int(sys.argv[5]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                   torch.nn.Linear(32, 4)).to(torch.bfloat16)

    g = torch.Generator().manual_seed(1)
    X = torch.randn(32, 16, generator=g).bfloat16()
    Y = torch.randn(32, 4, generator=g).bfloat16()
    results = {}
    for bucket_view in (False, True):
        net = DDP(model())
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=fastadam.torch.AdamW,
                                      parameters_as_bucket_view=bucket_view, lr=1e-2,
                                      master_weights=True, num_threads=1)
        for _ in range(steps):
            opt.zero_grad()
            ((net(X) - Y).float() ** 2).mean().backward()
            opt.step()
        local = opt.optim
        assert type(local).__module__ == "fastadam.torch"
        results[str(bucket_view)] = [sorted((k, str(v.dtype)) for k, v in s.items())
                                     for s in local.state.values() if s]
        if rank == 0:
            torch.save([p.detach() for p in net.parameters()], f"{out}/bucket{bucket_view}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_zero_redundancy_optimizer_bf16_master_weights(tmp_path):
    """Both ranks see the same batch: DDP's all-reduced bf16 gradient (g/2 + g/2) is g
    exactly, so the sharded run is the one-process run bit for bit, with
    parameters_as_bucket_view False and True (True moves every parameter's .data into a
    flat bf16 bucket after the optimizer is built). (Nearest rounding: with stochastic
    rounding each rank's optimizer would number the parameters of its own shard, so the
    random bits would differ from one process's.)"""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is unavailable")
    from ranks import launch

    steps = 10
    launch(tmp_path, ZERO_WORKER, (steps,), timeout=120, what="ZeroRedundancyOptimizer job")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        torch.bfloat16
    )
    initial = [p.detach().clone() for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g).bfloat16()
    y = torch.randn(32, 4, generator=g).bfloat16()
    opt = ft.AdamW(net.parameters(), lr=1e-2, master_weights=True)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x) - y).float() ** 2).mean().backward()
        opt.step()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for view in ("False", "True"):
        assert all(r[view] for r in ranks)  # each rank holds part of the state
        states = ranks[0][view] + ranks[1][view]
        assert len(states) == 4
        assert all(
            ["exp_avg", "torch.float32"] in s and ["master_param", "torch.float32"] in s
            for s in states
        )
    for view in (False, True):
        sharded = torch.load(tmp_path / f"bucket{view}.pt", weights_only=True)
        for a, b, c in zip(sharded, net.parameters(), initial):
            assert a.dtype == torch.bfloat16 and _same(a, b.detach()), view
            assert not torch.equal(a, c)


# -------------------------------------------------- 9. replaced storage, bad input
def test_replaced_storage_is_followed():
    p = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    opt = ft.Adam([p], lr=1e-2)  # bf16 state: the parameter's dtype
    p.grad = torch.ones(100, dtype=torch.bfloat16)
    opt.step()
    new = torch.randn(100, dtype=torch.bfloat16)
    p.data = new.clone()  # new storage: the plan follows it
    opt.step()
    assert not torch.equal(p.detach(), new)
    assert float(opt.state[p]["step"]) == 2
    p.data = p.data.view(torch.float16)  # same memory, another 16-bit dtype
    p.grad = torch.ones(100, dtype=torch.float16)
    before = _snapshot(opt, [p])
    with pytest.raises(ValueError, match=r"exp_avg.*bfloat16.*must be a dense float16"):
        opt.step()  # (a float16 parameter's state is float16)
    assert _same_snapshot(_snapshot(opt, [p]), before)
    # with state_dtype="bfloat16" the same reinterpretation is a valid float16 parameter
    q = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    opt = ft.Adam([q], lr=1e-2, state_dtype="bfloat16")
    q.grad = torch.ones(100, dtype=torch.bfloat16)
    opt.step()
    q.data = q.data.view(torch.float16)
    q.grad = torch.ones(100, dtype=torch.float16)
    before = q.detach().clone()
    opt.step()  # updated as float16 (not through the old bfloat16 plan)
    assert float(opt.state[q]["step"]) == 2 and q.dtype == torch.float16
    assert not torch.equal(q.detach(), before)


def test_float32_float64_and_16bit_parameters_in_one_optimizer():
    """One float32-compute plan for float32, float16 and bfloat16, one float64 plan;
    master weights apply to the 16-bit parameters only."""
    g = torch.Generator().manual_seed(0)
    ps = [
        torch.randn(50, generator=g).to(d).requires_grad_()
        for d in (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    ]
    qs = [
        p.detach().clone().requires_grad_()
        if p.dtype in (torch.float32, torch.float64)
        else p.detach().float().requires_grad_()
        for p in ps
    ]
    opt = ft.NAdam(ps, lr=1e-2, master_weights=True)
    ref = ft.NAdam(qs, lr=1e-2)
    for _t in range(4):
        gs = [torch.randn(50, generator=g) for _ in ps]
        for p, q, gr in zip(ps, qs, gs):
            p.grad, q.grad = gr.to(p.dtype), gr.to(p.dtype).to(q.dtype)
        opt.step()
        ref.step()
    assert len(opt._cache.plans) == 2
    for p, q in zip(ps, qs):
        s = opt.state[p]
        if p.dtype in HALF:
            assert _same(s["master_param"], q.detach()) and _same(
                p.detach(), q.detach().to(p.dtype)
            )
        else:
            assert "master_param" not in s and _same(p.detach(), q.detach())
        assert s["exp_avg"].dtype == q.dtype


BAD_CONSTRUCTORS = [
    (dict(state_dtype="int8"), ValueError, "state_dtype"),
    (dict(state_dtype=torch.int8), ValueError, "state_dtype"),
    (dict(state_dtype=torch.float16), ValueError, "state_dtype"),
    (dict(state_dtype=3), TypeError, "state_dtype"),
    (dict(rounding="up"), ValueError, "rounding"),
    (dict(rounding=None), TypeError, "rounding"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(master_weights="yes"), TypeError, "master_weights"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_CONSTRUCTORS)
def test_bad_format_options_are_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        ft.Adam([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], **kw)


@pytest.mark.parametrize(
    "params, kw, exc, match",
    [
        ([torch.zeros(3)], dict(master_weights=True), ValueError, "needs float16 or bfloat16"),
        ([torch.zeros(3, dtype=torch.bfloat16)], dict(state_dtype="float64"), TypeError, "float64"),
        (
            [torch.zeros(3, dtype=torch.float64)],
            dict(master_weights=True),
            ValueError,
            "needs float16 or bfloat16",
        ),
        (
            [torch.zeros(5000, dtype=torch.float64)],
            dict(state_dtype="8bit"),
            TypeError,
            "parameter 0.*float64",
        ),
        (
            [torch.zeros(3), torch.zeros(3, dtype=torch.float64)],
            dict(state_dtype="bfloat16"),
            TypeError,
            "parameter 1.*float64",
        ),
        ([torch.zeros(3)], dict(state_dtype="float64"), TypeError, "float64"),
        (
            [torch.zeros(3, dtype=torch.complex64)],
            dict(state_dtype="bfloat16"),
            TypeError,
            "complex",
        ),
    ],
)
def test_formats_that_do_not_fit_the_parameters_are_refused(params, kw, exc, match):
    with pytest.raises(exc, match=match):
        ft.Adam(params, **kw)


@pytest.mark.parametrize(
    "p, kw",
    [
        (torch.zeros(5000, dtype=torch.float64), dict(state_dtype="8bit")),
        (torch.zeros(3, dtype=torch.complex64), dict(state_dtype="bfloat16")),
        (torch.zeros(5000, dtype=torch.complex64), dict(state_dtype="8bit")),
    ],
)
def test_add_param_group_refuses_a_parameter_the_formats_do_not_fit(p, kw):
    opt = ft.Adam([torch.zeros(3, dtype=torch.bfloat16)], **kw)
    with pytest.raises(TypeError, match="param group 1, parameter 1"):
        opt.add_param_group({"params": [torch.zeros(2), p]})
    assert len(opt.param_groups) == 1


def test_16bit_gradient_of_another_dtype_is_refused_before_anything_moves():
    p = torch.randn(8, dtype=torch.float16, requires_grad=True)
    q = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    opt = ft.Adam([q, p], master_weights=True)
    q.grad = torch.ones(8, dtype=torch.bfloat16)
    p.grad = torch.ones(8, dtype=torch.float16)
    opt.step()
    before = _snapshot(opt, [q, p])
    p.grad.data = torch.ones(8, dtype=torch.bfloat16)  # (autograd would refuse it)
    with pytest.raises(TypeError, match=r"parameter 1.*float16 parameter must be float16"):
        opt.step()
    assert _same_snapshot(_snapshot(opt, [q, p]), before)
    p.grad = torch.ones(8, dtype=torch.float16)
    opt.step()
    assert float(opt.state[p]["step"]) == 2
    r = torch.zeros(8, requires_grad=True)
    opt = ft.Adam([r], state_dtype="bfloat16")
    r.grad = torch.ones(8)
    opt.step()
    before = _snapshot(opt, [r])
    r.grad.data = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"parameter 0 is a .8,. bfloat16.*must have the "
        "parameter's dtype, float32",
    ):
        opt.step()
    assert _same_snapshot(_snapshot(opt, [r]), before)
