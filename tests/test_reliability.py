"""Reliability: buffers kept alive for the whole C call, arrays changed between steps,
threads, fork, all-or-nothing operations, aliasing, undefined behaviour, error messages.

Scenarios that could crash, hang or need signals run in their own interpreter
(tests/workers.py) under a timeout, so that a regression fails a test instead of
killing the run.
"""

import copy
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

import fastadam
from fastadam import _core

WORKERS = pathlib.Path(__file__).with_name("workers.py")


def _isolated(name, timeout=120):
    """Run tests/workers.py NAME in a fresh interpreter (its own process group); fail on a
    crash, a hang or an assertion, showing its output. On a hang the whole group is
    killed, forked children included."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKERS), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{name} hung (no exit within {timeout} s)\n{out}{err}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # forked children left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
    if proc.returncode != 0 or not out.rstrip().endswith("ok"):
        how = (
            f"was killed by signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exited with {proc.returncode}"
        )
        pytest.fail(f"{name} {how}\n--- stdout\n{out}\n--- stderr\n{err}")


def _torch():
    return pytest.importorskip("torch", reason="torch is not installed")


def _bytes(arrays):
    return [np.asarray(a).tobytes() for a in arrays]


# ---------------------------------------------------------- 1. buffers stay alive
def test_grads_dropped_by_another_thread_during_a_step():
    _isolated("grads_dropped_during_step")


def test_torch_grads_dropped_by_another_thread_during_a_step():
    _torch()
    _isolated("torch_grads_dropped_during_step")


# ---------------------------------------------------- 2. arrays changed between steps
def _adam(n=64, dtype=np.float32, **kw):
    rng = np.random.default_rng(1)
    p = rng.standard_normal(n).astype(dtype)
    return p, fastadam.Adam([p], **kw), [rng.standard_normal(n).astype(dtype)]


def test_new_shape_with_the_same_elements_is_followed():
    p, opt, g = _adam(64)
    q, ref, _ = _adam(64)
    opt.step(g)
    ref.step(g)
    p.shape = (8, 8)
    opt.step([g[0].reshape(8, 8)])
    ref.step(g)
    assert np.array_equal(p.ravel(), q)
    assert opt.state[0]["exp_avg"].shape == (8, 8)
    assert opt.state_dict()["state"][0]["step"] == 2


@pytest.mark.parametrize(
    "change, match",
    [
        (
            lambda p: setattr(p, "dtype", np.float64),
            r"param group 0, params\[0\] is a \(32,\) float64",
        ),
        (lambda p: setattr(p.flags, "writeable", False), r"params\[0\] .*must be writable"),
        (lambda p: setattr(p, "dtype", np.dtype(">f4")), "float32 or float64|native"),
    ],
)
def test_changed_parameter_is_refused_and_nothing_moves(change, match):
    p, opt, g = _adam(64)
    opt.step(g)
    before = _bytes([p] + [opt.state[0][k] for k in ("exp_avg", "exp_avg_sq")])
    change(p)
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step([np.ones(p.shape, p.dtype)])
    p.dtype = np.float32 if p.dtype.itemsize == 4 or p.dtype.kind != "f" else p.dtype
    assert (
        _bytes([p.view(np.uint8)] + [opt.state[0][k] for k in ("exp_avg", "exp_avg_sq")]) == before
    )
    assert opt.state_dict()["step_count"] == 1


def test_parameter_replaced_in_param_groups_is_picked_up_with_fresh_state():
    p, opt, g = _adam(64)
    opt.step(g)
    new = np.zeros(64, np.float32)
    opt.param_groups[0]["params"][0] = new
    before = p.copy()
    opt.step(g)
    assert np.array_equal(p, before)  # the old array is not written any more
    fresh, ref, _ = _adam(64)
    fresh[...] = 0
    ref.step(g)
    assert np.array_equal(new, fresh)  # the new one starts from step 1, as in torch
    assert opt.state_dict()["state"][0]["step"] == 1
    # a parameter appended to the group's list is picked up too
    extra = np.zeros(5, np.float32)
    opt.param_groups[0]["params"].append(extra)
    opt.step(g + [np.ones(5, np.float32)])
    assert np.all(extra != 0)
    # and something that is not a float array is refused, naming it
    opt.param_groups[0]["params"].append("not an array")
    with pytest.raises(TypeError, match=r"param group 0, params\[2\]"):
        opt.step(g + [None, None])


def test_state_array_changed_is_refused():
    _p, opt, g = _adam(64)
    opt.step(g)
    opt._states[0]["exp_avg_sq"].flags.writeable = False
    with pytest.raises(ValueError, match=r"exp_avg_sqs.*writable"):
        opt.step(g)
    assert opt.state_dict()["step_count"] == 1


def test_resized_parameter_or_state_is_refused():
    _isolated("resized_under_the_optimizer")


def test_torch_replaced_storage_is_picked_up_never_written_stale():
    torch = _torch()
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.ones(100))
    q = torch.nn.Parameter(torch.ones(100))
    opt, ref = ft.Adam([p]), torch.optim.Adam([q], foreach=False)
    for o, x in ((opt, p), (ref, q)):
        x.grad = torch.full((100,), 0.5)
        o.step()
    old = opt.state[p]["exp_avg"].clone()
    keep = opt.state[p]["exp_avg"].untyped_storage()  # the storage being replaced
    snapshot = torch.tensor(keep.tolist()[:4])
    for o, x in ((opt, p), (ref, q)):
        o.state[x]["exp_avg"].set_(o.state[x]["exp_avg"].clone())  # new storage
        o.step()
    assert torch.equal(torch.tensor(keep.tolist()[:4]), snapshot)  # old memory untouched
    assert not torch.equal(opt.state[p]["exp_avg"], old)  # the new storage moved
    torch.testing.assert_close(p, q, rtol=1e-6, atol=0)
    # a parameter's data replaced by a view of another shape at the same address
    p.data = p.data[:50]
    p.grad = torch.ones(50)
    with pytest.raises(ValueError, match=r"param group 0, parameter 0"):
        opt.step()


def test_torch_state_replaced_by_a_wrong_shape_is_refused_and_nothing_moves():
    torch = _torch()
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.ones(10))
    opt = ft.Adam([p])
    p.grad = torch.ones(10)
    opt.step()
    opt.state[p]["exp_avg"].set_(torch.zeros(3))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of param group 0, parameter 0"):
        opt.step()
    assert torch.equal(p.detach(), before) and float(opt.state[p]["step"]) == 1


# -------------------------------------------------------------------- 3. threads
@pytest.mark.parametrize(
    "name",
    ["one_optimizer_many_threads", "two_optimizers_share_a_buffer", "functional_many_threads"],
)
def test_concurrent_steps_never_interleave(name):
    _isolated(name)


def test_buffer_exports_are_released_after_every_call():
    n = 16
    p = np.zeros(n, np.float32)
    opt = fastadam.Adam([p, np.zeros(n, np.float32)])
    raw = [bytearray(4 * n), bytearray(4 * n)]
    views = [memoryview(b).cast("f") for b in raw]
    opt.step(views)
    with pytest.raises(ValueError, match=r"grads\[1\] must have the shape"):
        opt.step([views[0], np.zeros(n + 1, np.float32)])  # the first was acquired, then released
    with pytest.raises(TypeError, match=r"grads\[1\] must have dtype"):
        opt.step([views[0], memoryview(bytearray(8 * n)).cast("d")])
    fastadam.clip_grad_norm_(views, 1.0)
    with pytest.raises(ValueError):
        fastadam.clip_grad_norm_([views[0], views[0]], 1.0)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    fastadam.adam_step(p, views[0], m, v, step=1)
    with pytest.raises(ValueError):
        fastadam.adam_step(p, views[0], m, v, step=0)
    for mv, b in zip(views, raw):
        mv.release()  # raises BufferError if fastadam still held an export of it
        b.extend(b"1234")  # likewise for the bytearray itself


# ---------------------------------------------------------------------- 4. fork
def test_fork_after_a_threaded_step():
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    _isolated("fork_after_threaded_step")


def test_multiprocessing_fork_start_method():
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    _isolated("multiprocessing_fork_start_method")


# ------------------------------------------------------------- 5. all or nothing
def test_interrupts_keep_the_counts_with_the_buffers():
    _isolated("interrupts_keep_counts_consistent")


def test_family_interrupts_keep_the_counts_with_the_buffers():
    _isolated("family_interrupts_keep_counts_consistent")


def test_torch_interrupts_keep_the_counts_with_the_buffers():
    _torch()
    _isolated("torch_interrupts_keep_counts_consistent")


def _two_dtype_model(torch):
    import fastadam.torch as ft

    a = torch.nn.Parameter(torch.ones(8))
    b = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
    opt = ft.Adam([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.ones(8), torch.ones(5, dtype=torch.float64)
    opt.step()
    return a, b, opt


@pytest.mark.parametrize(
    "spoil, match",
    [
        (
            lambda a, b, opt: setattr(b, "grad", opt.state[b]["exp_avg"]),
            r"grad of param group 1, parameter 0 shares memory with exp_avg of param group 1",
        ),
        (
            lambda a, b, opt: opt.state[b]["step"].fill_(-3),
            r"state\['step'\] of param group 1, parameter 0 must be >= 0",
        ),
        (
            lambda a, b, opt: opt.state[b]["step"].fill_(float("nan")),
            r"state\['step'\] of param group 1, parameter 0 must be >= 0",
        ),
    ],
)
def test_torch_step_checks_every_dtype_before_any_moves(spoil, match):
    torch = _torch()
    a, b, opt = _two_dtype_model(torch)
    spoil(a, b, opt)
    before = [t.detach().clone() for t in (a, b, opt.state[a]["exp_avg"], opt.state[a]["step"])]
    with pytest.raises(ValueError, match=match):
        opt.step()
    after = [t.detach() for t in (a, b, opt.state[a]["exp_avg"], opt.state[a]["step"])]
    assert all(
        torch.equal(x, y) or (x.isnan().all() and y.isnan().all()) for x, y in zip(before, after)
    )


def test_torch_refused_first_step_leaves_no_state():
    torch = _torch()
    import fastadam.torch as ft

    a = torch.nn.Parameter(torch.ones(8))
    b = torch.nn.Parameter(torch.ones(8))
    opt = ft.Adam([{"params": [a]}, {"params": [b], "amsgrad": True}])
    a.grad, b.grad = torch.ones(8), a.data  # b's gradient is a's memory: refused
    with pytest.raises(ValueError, match="param group 1, parameter 0 shares memory"):
        opt.step()
    assert len(opt.state) == 0
    assert torch.equal(a.detach(), torch.ones(8))


def _np_state(opt):
    sd = opt.state_dict()
    return sd["step_count"], {
        k: {kk: (vv.tobytes() if isinstance(vv, np.ndarray) else vv) for kk, vv in e.items()}
        for k, e in sd["state"].items()
    }


def _bad_state_dicts(sd):
    def edit(fn):
        d = copy.deepcopy(sd)
        fn(d)
        return d

    def put(path, value):
        def fn(d):
            x = d
            for k in path[:-1]:
                x = x[k]
            x[path[-1]] = value

        return fn

    def drop(path):
        def fn(d):
            x = d
            for k in path[:-1]:
                x = x[k]
            del x[path[-1]]

        return fn

    cases = []
    for step, exc in (
        (2**62, ValueError),
        (2**63, ValueError),
        (-1, ValueError),
        (1.5, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("3", TypeError),
        (True, TypeError),
        (None, TypeError),
        (np.array([1, 2]), TypeError),
    ):
        cases.append(
            (
                f"step={step!r}",
                edit(put(("state", 0, "step"), step)),
                exc,
                r"state_dict\['state'\]\[0\]\['step'\]",
            )
        )
    cases += [
        ("step_count too large", edit(put(("step_count",), 2**62)), ValueError, "step_count"),
        ("step_count negative", edit(put(("step_count",), -1)), ValueError, "step_count"),
        ("missing state", edit(drop(("state",))), ValueError, "'state'"),
        (
            "missing exp_avg_sq",
            edit(drop(("state", 1, "exp_avg_sq"))),
            ValueError,
            r"\[1\] is missing \['exp_avg_sq'\]",
        ),
        (
            "extra entry key",
            edit(put(("state", 0, "momentum_buffer"), np.zeros(3))),
            ValueError,
            "unknown keys",
        ),
        (
            "extra group key",
            edit(put(("param_groups", 0, "momentum"), 0.9)),
            ValueError,
            "unknown keys",
        ),
        ("extra top-level key", edit(put(("extra",), 1)), ValueError, "unknown keys"),
        ("unknown parameter id", edit(put(("state", 7), {})), ValueError, "unknown parameters"),
        (
            "wrong shape",
            edit(put(("state", 1, "exp_avg"), np.zeros(4, np.float32))),
            ValueError,
            r"\[1\]\['exp_avg'\] must have shape",
        ),
        (
            "wrong dtype",
            edit(put(("state", 0, "exp_avg"), np.zeros(3))),
            ValueError,
            "dtype float32",
        ),
        ("not an array", edit(put(("state", 0, "exp_avg"), object())), ValueError, "shape"),
        ("entry not a dict", edit(put(("state", 0), [1, 2])), TypeError, "must be a dict"),
        ("bad lr", edit(put(("param_groups", 0, "lr"), -1.0)), ValueError, "lr"),
        (
            "bad eps_mode",
            edit(put(("param_groups", 0, "eps_mode"), ["paper"])),
            ValueError,
            "eps_mode",
        ),
        ("groups not a list", edit(put(("param_groups",), 3)), TypeError, "param_groups"),
        (
            "param ids not ints",
            edit(put(("param_groups", 0, "params"), ["a", "b"])),
            TypeError,
            "int id",
        ),
    ]
    return cases


def test_numpy_load_state_dict_refuses_bad_entries_and_changes_nothing():
    ps = [np.ones(3, np.float32), np.ones(5, np.float32)]
    opt = fastadam.Adam(ps, lr=lambda t: 1e-3)
    g = [np.full(3, 0.5, np.float32), np.full(5, -1.0, np.float32)]
    opt.step(g)
    sd = opt.state_dict()
    for what, bad, exc, match in _bad_state_dicts(sd):
        before = _np_state(opt), _bytes(ps)
        with pytest.raises(exc, match=match):
            opt.load_state_dict(bad)
        assert (_np_state(opt), _bytes(ps)) == before, what
    opt.load_state_dict(sd)  # and a good one still loads
    opt.step(g)
    assert opt.state_dict()["step_count"] == 2


def test_numpy_step_count_limits():
    p = np.zeros(3, np.float32)
    opt = fastadam.Adam([p])
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    sd["state"][0]["step"] = 2**62 - 2
    sd["step_count"] = 2**62 - 2
    opt.load_state_dict(sd)
    opt.step([np.ones(3, np.float32)])  # reaches 2**62 - 1: still representable
    with pytest.raises(ValueError, match="2\\*\\*62 - 1 steps"):
        opt.step([np.ones(3, np.float32)])
    opt.load_state_dict(opt.state_dict())  # what it saves, it loads


def test_torch_load_state_dict_refuses_bad_entries_and_changes_nothing():
    torch = _torch()
    import fastadam.torch as ft

    ps = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = ft.Adam([{"params": [ps[0]]}, {"params": [ps[1]], "amsgrad": True}])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()

    def edited(fn):
        d = copy.deepcopy(sd)
        fn(d)
        return d

    cases = [
        (
            lambda d: d["state"][0].__setitem__("step", torch.tensor(-1.0)),
            ValueError,
            r"state\['step'\] of param group 0, parameter 0 must be >= 0",
        ),
        (lambda d: d["state"][0].__setitem__("step", float("nan")), ValueError, ">= 0"),
        (lambda d: d["state"][0].__setitem__("step", "3"), TypeError, "step"),
        (lambda d: d["state"][0].__setitem__("step", torch.ones(2)), ValueError, "1-element"),
        (
            lambda d: d["state"][1].pop("exp_avg_sq"),
            ValueError,
            r"param group 1, parameter 0 lacks \['exp_avg_sq'\]",
        ),
        (
            lambda d: d["state"][1].__setitem__("momentum_buffer", torch.zeros(2, 2)),
            ValueError,
            "unknown keys",
        ),
        (
            lambda d: d["state"][1].__setitem__("exp_avg", torch.zeros(4)),
            ValueError,
            r"state\['exp_avg'\] of param group 1, parameter 0 .* shape",
        ),
        (lambda d: d["state"][0].__setitem__("exp_avg", [0.0, 0.0, 0.0]), TypeError, "tensor"),
        (
            lambda d: d["param_groups"][0].__setitem__("lr", -1.0),
            ValueError,
            "Invalid learning rate: -1.0",
        ),
        (lambda d: d.pop("state"), ValueError, "missing"),
        (lambda d: d.__setitem__("extra", 1), ValueError, "unknown keys"),
        (lambda d: d.__setitem__("param_groups", 5), TypeError, "param_groups"),
    ]
    for fn, exc, match in cases:
        before = (
            {id(k): {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()},
            [dict(g) for g in opt.param_groups],
        )
        state_obj = opt.state
        with pytest.raises(exc, match=match):
            opt.load_state_dict(edited(fn))
        assert opt.state is state_obj
        assert [dict(g) for g in opt.param_groups] == before[1]
        for k, v in opt.state.items():
            assert all(torch.equal(v[kk], before[0][id(k)][kk]) for kk in v)
    opt.load_state_dict(sd)
    opt.step()


def test_torch_accepts_every_step_count_torch_accepts():
    torch = _torch()
    import fastadam.torch as ft

    for step in (
        2.0**40,
        1.5,
        float("inf"),
        2**53 + 1,
        torch.tensor(7, dtype=torch.int64),
        torch.tensor(3.0, dtype=torch.float64),
        0,
    ):
        ours, theirs = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(6))
        o, t = ft.Adam([ours], lr=0.1), torch.optim.Adam([theirs], lr=0.1, foreach=False)
        for opt, p in ((o, ours), (t, theirs)):
            p.grad = torch.linspace(-1, 1, 6)
            opt.step()
            sd = opt.state_dict()
            sd["state"][0]["step"] = step.clone() if isinstance(step, torch.Tensor) else step
            opt.load_state_dict(sd)
            opt.step()
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7, msg=f"step {step!r}")
        assert float(o.state[ours]["step"]) == float(t.state[theirs]["step"])


# ---------------------------------------------------------------- 6. aliasing
@pytest.mark.parametrize(
    "make",
    [
        lambda a: [a, a],
        lambda a: [a[:600], a[400:]],
        lambda a: [a.reshape(10, 100), a[100:200]],
    ],
    ids=["same array twice", "overlapping views", "view inside another"],
)
def test_clip_grad_norm_refuses_shared_memory(make):
    a = np.full(1000, 3.0, np.float32)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] share memory"):
        fastadam.clip_grad_norm_(make(a), 1.0)
    assert np.all(a == 3.0)
    fastadam.clip_grad_norm_([a[:500], a[500:]], 1.0)  # adjacent, not overlapping: fine
    assert np.allclose(np.linalg.norm(a.astype(np.float64)), 1.0, rtol=1e-6)


# --------------------------------------------------------- 7. undefined behaviour
def _unaligned(n, dtype=np.float32):
    itemsize = np.dtype(dtype).itemsize
    a = np.frombuffer(bytearray(itemsize * n + 1), dtype=dtype, count=n, offset=1)
    assert a.ctypes.data % itemsize and a.flags.c_contiguous
    return a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_buffers_are_refused(dtype):
    n = 33
    ok = {k: np.zeros(n, dtype) for k in ("param", "grad", "m", "v")}
    for which in ("grad", "param", "m"):
        bufs = dict(ok)
        bufs[which] = _unaligned(n, dtype)
        assert bufs[which].flags.writeable
        with pytest.raises(
            ValueError, match=f"{which if which != 'm' else 'exp_avg'} is not aligned"
        ):
            fastadam.adam_step(bufs["param"], bufs["grad"], bufs["m"], bufs["v"], step=1)
    with pytest.raises(ValueError, match=r"grads\[0\] is not aligned"):
        fastadam.clip_grad_norm_([_unaligned(n, dtype)], 1.0)
    p = np.zeros(n, dtype)
    opt = fastadam.Adam([p])
    with pytest.raises(ValueError, match=r"grads\[0\] is not aligned"):
        opt.step([_unaligned(n, dtype)])
    assert not p.any()


def test_writable_unaligned_parameter_is_refused():
    raw = bytearray(4 * 33 + 1)
    p = np.frombuffer(memoryview(raw)[1:], dtype=np.float32)  # writable, odd address
    assert p.flags.writeable and p.ctypes.data % 4
    with pytest.raises(ValueError, match=r"params\[0\] is not aligned"):
        fastadam.Adam([p])
    with pytest.raises(ValueError, match="param is not aligned"):
        fastadam.adam_step(
            p, np.zeros(33, np.float32), np.zeros(33, np.float32), np.zeros(33, np.float32), step=1
        )


def test_no_integer_overflow_from_accepted_input():
    p = np.zeros(2 * 16384 + 5, np.float32)
    g = [np.ones_like(p)]
    opt = fastadam.Adam([p], num_threads=2**31 - 1)  # accepted; the team is capped
    q = p.copy()
    opt.step(g)
    fastadam.Adam([q], num_threads=1).step(g)
    assert np.array_equal(p, q)
    assert 1 <= _core.thread_cap() <= 4 * (os.cpu_count() or 1) + _core.max_threads()
    for bad in (2**31, 2**63, -1, 0):
        with pytest.raises(ValueError, match="num_threads"):
            fastadam.Adam([p], num_threads=bad)
        with pytest.raises(ValueError, match="num_threads"):
            fastadam.adam_step(p, g[0], np.zeros_like(p), np.zeros_like(p), step=1, num_threads=bad)
    with pytest.raises(ValueError, match="step"):
        fastadam.adam_step(p, g[0], np.zeros_like(p), np.zeros_like(p), step=2**62)


# ---------------------------------------------------------------- 8. clear errors
def test_numpy_scalars_are_accepted_as_python_scalars():
    p = np.zeros(10, np.float32)
    kw = dict(
        lr=np.float32(1e-3),
        betas=(np.float32(0.9), np.float64(0.999)),
        eps=np.float16(1e-4),
        weight_decay=np.int64(0),
        amsgrad=np.True_,
        maximize=np.False_,
        bias_correction=np.True_,
        eps_mode=np.str_("hat"),
        num_threads=np.int32(1),
        max_grad_norm=np.float32(1.0),
        skip_nonfinite=np.True_,
    )
    opt = fastadam.Adam([p], **kw)
    opt.step([np.ones(10, np.float32)], grad_scale=np.float64(2.0))
    ref = fastadam.Adam(
        [q := np.zeros(10, np.float32)],
        **{
            k: (
                v.item()
                if isinstance(v, np.generic)
                else tuple(x.item() for x in v)
                if isinstance(v, tuple)
                else v
            )
            for k, v in kw.items()
        },
    )
    ref.step([np.ones(10, np.float32)], grad_scale=2.0)
    assert np.array_equal(p, q)
    fastadam.adam_step(
        p,
        np.ones(10, np.float32),
        np.zeros(10, np.float32),
        np.zeros(10, np.float32),
        step=np.int64(3),
        lr=np.float32(0.1),
        amsgrad=np.False_,
        maximize=np.True_,
        skip_nonfinite=np.False_,
    )
    fastadam.clip_grad_norm_([np.ones(4, np.float32)], np.float32(1.0), num_threads=np.int8(1))


def test_torch_accepts_numpy_scalars():
    torch = _torch()
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.Adam(
        [p], lr=np.float64(1e-2), amsgrad=np.True_, maximize=np.False_, num_threads=np.int64(1)
    )
    p.grad = torch.ones(4)
    opt.step(grad_scale=np.float32(2.0))
    assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("mode", [["paper"], {"hat": 1}, "keras", None, 0])
def test_bad_eps_mode_lists_the_choices(mode):
    with pytest.raises(ValueError, match="eps_mode must be one of 'paper', 'hat'"):
        fastadam.Adam([np.zeros(3, np.float32)], eps_mode=mode)
    with pytest.raises(ValueError, match="eps_mode must be one of 'paper', 'hat'"):
        fastadam.adam_step(*(np.zeros(3, np.float32) for _ in range(4)), step=1, eps_mode=mode)


def test_clip_grad_norm_names_max_norm():
    g = [np.ones(3, np.float32)]
    for bad, exc in (
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (None, TypeError),
        ("1", TypeError),
        (np.array([1.0, 2.0]), TypeError),
    ):
        with pytest.raises(exc, match="max_norm"):
            fastadam.clip_grad_norm_(g, bad)
    assert np.all(g[0] == 1)


def test_non_scalar_grad_scale_is_a_clear_type_error():
    p = np.zeros(3, np.float32)
    opt = fastadam.Adam([p])
    for bad in (np.array([1.0, 2.0]), [2.0], "2", np.array(2.0)):
        with pytest.raises(TypeError, match="grad_scale must be a real number"):
            opt.step([np.ones(3, np.float32)], grad_scale=bad)
        with pytest.raises(TypeError, match="grad_scale must be a real number"):
            fastadam.adam_step(
                p,
                np.ones(3, np.float32),
                np.zeros(3, np.float32),
                np.zeros(3, np.float32),
                step=1,
                grad_scale=bad,
            )
    assert not p.any() and opt.state_dict()["step_count"] == 0


def test_torch_non_scalar_grad_scale_and_found_inf():
    torch = _torch()
    import fastadam.torch as ft

    p = torch.nn.Parameter(torch.ones(4))
    opt = ft.Adam([p])
    p.grad = torch.ones(4)
    for name in ("grad_scale", "found_inf"):
        for bad in (torch.ones(2), "1", [1.0]):
            with pytest.raises(TypeError, match=f"{name} must be a number or a 1-element"):
                opt.step(**{name: bad})
    assert not opt.state and torch.equal(p.detach(), torch.ones(4))


def test_num_threads_checked_at_construction():
    p = np.zeros(3, np.float32)
    for bad, exc in (
        (0, ValueError),
        (2**31, ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("2", TypeError),
        (np.float64(2), TypeError),
    ):
        with pytest.raises(exc, match="num_threads"):
            fastadam.Adam([p], num_threads=bad)
    assert fastadam.Adam([p], num_threads=np.int16(2)).num_threads == 2
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import fastadam.torch as ft

    for bad, exc in ((0, ValueError), (2**31, ValueError), (1.5, TypeError)):
        with pytest.raises(exc, match="num_threads"):
            ft.Adam([torch.nn.Parameter(torch.ones(2))], num_threads=bad)


def test_torch_errors_name_the_users_parameter():
    torch = _torch()
    import fastadam.torch as ft

    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    c = torch.nn.Parameter(torch.ones(2))
    opt = ft.Adam([{"params": [a]}, {"params": [b, c]}])
    a.grad, b.grad = torch.ones(3), torch.ones(4, dtype=torch.float64)
    c.grad = a.data[:2]  # shares memory with a parameter the step writes
    with pytest.raises(ValueError) as e:
        opt.step()
    # c is block 1 of the float32 plan; the message names it as the user knows it
    assert (
        "grad of param group 1, parameter 1 shares memory with param group 0, parameter 0"
        in str(e.value)
    ), e.value
