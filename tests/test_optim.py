"""The optimizer classes, state_dict round trips, schedules, config and SIMD selection."""

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import fastadam
from fastadam import reference


def _model(rng, dtype=np.float32):
    return [rng.standard_normal(s).astype(dtype) for s in [(4, 5), (5,), (3, 3, 2), (1,)]]


def _grads(rng, params, t):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


@pytest.mark.parametrize(
    "cls, kw",
    [
        (fastadam.Adam, {}),
        (fastadam.Adam, dict(amsgrad=True, weight_decay=0.01)),
        (fastadam.AdamW, dict(amsgrad=True, maximize=True)),
        (fastadam.Adam, dict(eps_mode="hat", lr=fastadam.InverseSqrtDecay(0.01))),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_continues_bit_for_bit(cls, kw, dtype):
    rng = np.random.default_rng(3)
    params = _model(rng, dtype)
    grads = [_grads(rng, params, t) for t in range(10)]
    opt = cls(params, **kw)
    for g in grads[:5]:
        opt.step(g)
    sd = copy.deepcopy(opt.state_dict())
    saved_params = [p.copy() for p in params]
    for g in grads[5:]:
        opt.step(g)
    # a fresh optimizer over copies of the saved parameters, loaded from the checkpoint
    params2 = [p.copy() for p in saved_params]
    opt2 = cls(params2, **kw)
    opt2.load_state_dict(sd)
    for g in grads[5:]:
        opt2.step(g)
    for a, b in zip(params, params2):
        assert np.array_equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == 10


def test_state_dict_layout_mirrors_torch():
    rng = np.random.default_rng(0)
    params = _model(rng)
    opt = fastadam.Adam(
        [{"params": params[:2]}, {"params": params[2:], "lr": 0.1, "amsgrad": True}]
    )
    sd = opt.state_dict()
    assert sd["state"] == {}  # nothing stepped yet, as torch
    opt.step([np.ones_like(p) for p in params[:3]] + [None])
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2]  # params[3] had no grad: no state
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(sd["state"][2]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["state"][2]["exp_avg"].shape == params[2].shape
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][1]["lr"] == 0.1 and sd["param_groups"][0]["lr"] == 1e-3
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)


def test_none_grad_skips_parameter_and_its_step():
    rng = np.random.default_rng(0)
    params = _model(rng)
    before = params[1].copy()
    opt = fastadam.Adam(params)
    g = _grads(rng, params, 0)
    opt.step([g[0], None, g[2], g[3]])
    assert np.array_equal(params[1], before)
    assert [s["step"] for s in opt.state] == [1, 0, 1, 1]
    opt.step(g)
    assert [s["step"] for s in opt.state] == [2, 1, 2, 2]
    # params[1]'s first real step uses t=1 bias correction, like torch
    ref = before.copy()
    reference.adam_step(ref, g[1], np.zeros_like(ref), np.zeros_like(ref), step=1)
    assert np.array_equal(params[1], ref)


def test_param_groups_with_their_own_options_match_reference():
    rng = np.random.default_rng(5)
    params = _model(rng)
    ref = [p.copy() for p in params]
    kws = [
        dict(lr=0.01, betas=(0.8, 0.9)),
        dict(weight_decay=0.1, decoupled_weight_decay=True, eps=1e-4, amsgrad=True),
    ]
    opt = fastadam.Adam([dict(params=params[:2], **kws[0]), dict(params=params[2:], **kws[1])])
    state = [[np.zeros_like(p) for _ in range(3)] for p in params]
    for t in range(1, 6):
        g = _grads(rng, params, t)
        opt.step(g)
        for i, p in enumerate(ref):
            m, v, vm = state[i]
            reference.adam_step(p, g[i], m, v, step=t, max_exp_avg_sq=vm, **kws[i >= 2])
    for a, b in zip(params, ref):
        assert np.array_equal(a, b)


def test_lr_changes_and_schedules():
    rng = np.random.default_rng(1)
    p = rng.standard_normal(50).astype(np.float32)
    q = p.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    opt = fastadam.Adam([p], lr=fastadam.InverseSqrtDecay(0.1))
    assert repr(opt.param_groups[0]["lr"]) == "InverseSqrtDecay(alpha=0.1)"
    for t in range(1, 5):
        g = rng.standard_normal(50).astype(np.float32)
        opt.step([g])
        reference.adam_step(q, g, m, v, step=t, lr=0.1 / math.sqrt(t))
        assert np.array_equal(p, q)
    opt.param_groups[0]["lr"] = 0.5  # changed by hand between steps, as torch schedulers do
    g = rng.standard_normal(50).astype(np.float32)
    opt.step([g])
    reference.adam_step(q, g, m, v, step=5, lr=0.5)
    assert np.array_equal(p, q)


def test_adamw_defaults_and_decoupled_decay():
    p = np.ones(8, np.float32)
    opt = fastadam.AdamW([p])
    g = opt.param_groups[0]
    assert g["weight_decay"] == 1e-2 and g["decoupled_weight_decay"] is True
    opt.step([np.zeros_like(p)])  # zero gradient: only the decay acts
    assert np.array_equal(p, np.full(8, np.float32(1.0) * np.float32(1 - 1e-3 * 1e-2)))
    assert (
        fastadam.Adam([np.ones(2, np.float32)]).param_groups[0]["decoupled_weight_decay"] is False
    )


def test_state_is_64_byte_aligned_and_step_does_not_allocate():
    rng = np.random.default_rng(0)
    params = _model(rng)
    opt = fastadam.Adam(params, amsgrad=True)
    for s in opt.state:
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert s[k].ctypes.data % 64 == 0
    ids = [[id(s[k]) for k in ("exp_avg", "exp_avg_sq")] for s in opt._states]
    opt.step(_grads(rng, params, 0))
    assert ids == [[id(s[k]) for k in ("exp_avg", "exp_avg_sq")] for s in opt._states]


def test_add_param_group_and_turning_amsgrad_on():
    rng = np.random.default_rng(0)
    params = _model(rng)
    opt = fastadam.Adam(params[:2])
    opt.step(_grads(rng, params[:2], 0))
    opt.add_param_group({"params": params[2:], "lr": 0.1})
    assert [s["step"] for s in opt.state] == [1, 1, 0, 0]
    opt.step(_grads(rng, params, 1))
    assert [s["step"] for s in opt.state] == [2, 2, 1, 1]
    opt.param_groups[0]["amsgrad"] = True
    opt.step(_grads(rng, params, 2))
    assert "max_exp_avg_sq" in opt.state[0] and "max_exp_avg_sq" not in opt.state[2]
    assert np.all(opt.state[0]["max_exp_avg_sq"] > 0)


def test_config_and_info():
    c = fastadam.config()
    assert c["version"] == fastadam.__version__
    assert c["simd"] in c["simd_available"]
    assert set(c["simd_available"]) <= set(c["simd_compiled"])
    assert "scalar" in c["simd_available"]
    assert isinstance(c["openmp"], bool) and c["max_threads"] >= 1
    lo, hi = c["prefetch_window"]  # (7/16 L3, L3], or (0, 0] = never
    assert lo == hi // 16 * 7 and (hi == 0 or hi >= 1 << 20), c["prefetch_window"]
    out = subprocess.run(
        [sys.executable, "-m", "fastadam", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert f"SIMD path in use : {c['simd']}" in out
    assert "prefetch         : " + ("never" if hi == 0 else f"steps with {lo / 2**20:g} MiB") in out
    for name in c["simd_compiled"]:
        assert name in out


def _cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n")[0].splitlines()
    except OSError:
        return None
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.skipif(_cpuinfo() is None, reason="needs /proc/cpuinfo (Linux)")
def test_prefetch_window_only_on_zen3():
    """Software prefetching is automatic only where it was measured to pay: AMD family
    19h, Zen 3 models (00-0Fh, 20-5Fh). Elsewhere (Zen 4 included) the window is empty."""
    info = _cpuinfo()
    zen3 = (
        info.get("vendor_id") == "AuthenticAMD"
        and info.get("cpu family") == "25"
        and (int(info["model"]) <= 0x0F or 0x20 <= int(info["model"]) <= 0x5F)
    )
    _lo, hi = fastadam.config()["prefetch_window"]
    assert (hi > 0) == zen3, (info.get("vendor_id"), info.get("cpu family"), info.get("model"))


_CHILD = """
import numpy as np, fastadam, sys
rng = np.random.default_rng(0)
p = rng.standard_normal(1001).astype(np.float32); m = np.zeros_like(p); v = np.zeros_like(p)
for t in range(1, 4):
    fastadam.adam_step(p, rng.standard_normal(1001).astype(np.float32), m, v, step=t)
sys.stdout.write(fastadam.config()["simd"] + " " + p.tobytes().hex())
"""


def test_fastadam_simd_environment_variable():
    """FASTADAM_SIMD forces each usable path (same bits from each), and refuses the others."""
    c = fastadam.config()
    results = {}
    for name in c["simd_available"] + ["auto"]:
        env = dict(os.environ, FASTADAM_SIMD=name)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True
        ).stdout
        used, bits = out.split()
        # "auto" picks the best usable path (simd_available is in order of preference)
        assert used == (c["simd_available"][-1] if name == "auto" else name)
        results[name] = bits
    assert len(set(results.values())) == 1
    unusable = [
        n for n in ("scalar", "sse2", "avx2", "avx512", "neon") if n not in c["simd_available"]
    ] + ["avx9000"]
    for name in unusable:
        env = dict(os.environ, FASTADAM_SIMD=name)
        r = subprocess.run(
            [sys.executable, "-c", "import fastadam"], env=env, capture_output=True, text=True
        )
        assert r.returncode != 0
        assert f"FASTADAM_SIMD={name!r}" in r.stderr
        assert (
            "not compiled" in r.stderr
            or "does not support" in r.stderr
            or "unknown SIMD path" in r.stderr
        )


def test_step_allocates_no_buffers():
    """A step over 1e6 parameters allocates no array memory (tracemalloc sees NumPy's
    data allocations): only a few small Python objects."""
    import tracemalloc

    params = [np.zeros(500_000, np.float32), np.zeros((500, 1000), np.float32)]
    grads = [np.ones_like(p) for p in params]
    opt = fastadam.Adam(params, amsgrad=True)
    opt.step(grads)
    tracemalloc.start()
    try:
        opt.step(grads)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096, f"a step allocated {peak} bytes"
    # and the reference, by contrast, allocates temporaries of the tensor's size
    tracemalloc.start()
    try:
        reference.adam_step(
            params[0], grads[0], opt.state[0]["exp_avg"], opt.state[0]["exp_avg_sq"], step=3
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 2_000_000
