"""Bad input raises TypeError/ValueError naming the argument, and changes nothing."""

import copy

import numpy as np
import pytest

import fastadam


def _arrays(n=33, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: rng.random(n).astype(dtype)
        for k in ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    }


def _call(a, **kw):
    kw.setdefault("step", 1)
    fastadam.adam_step(
        a["param"],
        a["grad"],
        a["exp_avg"],
        a["exp_avg_sq"],
        max_exp_avg_sq=a.get("max_exp_avg_sq"),
        **kw,
    )


def _rejects(exc, match, a, **kw):
    """The call raises exc matching `match` and leaves every buffer bit-identical."""
    before = {k: np.array(v, copy=True) for k, v in a.items() if v is not None}
    with pytest.raises(exc, match=match):
        _call(a, **kw)
    for k, v in before.items():
        assert np.array_equal(np.asarray(a[k]), v), f"{k} was modified by a rejected call"


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=float("inf")), ValueError, "lr"),
        (dict(lr="0.1"), TypeError, "lr"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9, float("nan"))), ValueError, r"betas\[1\]"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(step=0), ValueError, "step"),
        (dict(step=-3), ValueError, "step"),
        (dict(step=1.0), TypeError, "step"),
        (dict(step=True), TypeError, "step"),
        (dict(eps_mode="keras"), ValueError, "eps_mode"),
        (dict(num_threads=0), ValueError, "num_threads"),
        (dict(num_threads=1.5), TypeError, "num_threads"),
        (dict(grad_scale=0.0), ValueError, "grad_scale"),
        (dict(amsgrad=True, max_exp_avg_sq=None), ValueError, "max_exp_avg_sq"),
    ],
)
def test_bad_hyperparameters(kw, exc, match):
    a = _arrays()
    if "max_exp_avg_sq" in kw:
        a["max_exp_avg_sq"] = kw.pop("max_exp_avg_sq")
    _rejects(exc, match, a, **kw)


def test_wrong_and_mixed_dtypes():
    a = _arrays()
    a["param"] = a["param"].astype(np.float16)
    _rejects(TypeError, "param must have dtype", a)
    a = _arrays()
    a["param"] = a["param"].astype(np.int32)
    _rejects(TypeError, "param", a)
    a = _arrays()
    a["grad"] = a["grad"].astype(np.float64)
    _rejects(TypeError, "grad must have dtype float32", a)
    a = _arrays(dtype=np.float64)
    a["exp_avg_sq"] = a["exp_avg_sq"].astype(np.float32)
    _rejects(TypeError, "exp_avg_sq must have dtype float64", a)
    a = _arrays()
    a["max_exp_avg_sq"] = a["max_exp_avg_sq"].astype(np.float64)
    _rejects(TypeError, "max_exp_avg_sq", a, amsgrad=True)


def test_not_a_buffer():
    a = _arrays()
    a["grad"] = [0.0] * 33
    _rejects(TypeError, "grad must support the buffer protocol", a)
    a = _arrays()
    a["param"] = None
    _rejects(TypeError, "param", a)


def test_size_and_shape_mismatch():
    a = _arrays()
    a["exp_avg"] = np.zeros(32, np.float32)
    _rejects(ValueError, "exp_avg must have the shape", a)
    a = _arrays()
    a["grad"] = a["grad"].reshape(3, 11)
    _rejects(ValueError, "grad must have the shape", a)


def test_non_contiguous_and_read_only():
    a = _arrays(66)
    a["exp_avg"] = a["exp_avg"][::2]
    for k in ("param", "grad", "exp_avg_sq", "max_exp_avg_sq"):
        a[k] = a[k][:33]
    _rejects(ValueError, "exp_avg must be C-contiguous", a)
    a = _arrays()
    a["param"].flags.writeable = False
    _rejects(ValueError, "param is updated in place and must be writable", a)
    a = _arrays()
    a["exp_avg_sq"] = a["exp_avg_sq"].view()
    a["exp_avg_sq"].flags.writeable = False
    _rejects(ValueError, "exp_avg_sq .*writable", a)


def test_overlapping_buffers():
    a = _arrays()
    a["grad"] = a["exp_avg"]
    _rejects(ValueError, "grad shares memory with exp_avg", a)
    a = _arrays()
    a["exp_avg_sq"] = a["exp_avg"]
    _rejects(ValueError, "share memory|twice", a)
    base = np.zeros(60, np.float32)
    a = _arrays()
    a["exp_avg"], a["exp_avg_sq"] = base[:33], base[20:53]  # partial overlap
    _rejects(ValueError, "exp_avg and exp_avg_sq share memory", a)
    a = _arrays()
    a["max_exp_avg_sq"] = a["param"]
    _rejects(ValueError, "share memory|twice", a, amsgrad=True)


# ----------------------------------------------------------------------- optimizer
def _opt_setup(n_params=6, dtype=np.float32, **kw):
    rng = np.random.default_rng(1)
    params = [
        rng.random(s).astype(dtype) for s in [(3, 4), (5,), (7,), (2, 2), (9,), (1,)][:n_params]
    ]
    return params, fastadam.Adam(params, **kw)


def _snapshot(params, opt):
    return [p.copy() for p in params], copy.deepcopy(opt.state_dict())


def _unchanged(params, opt, snap):
    ps, sd = snap
    for a, b in zip(params, ps):
        assert np.array_equal(a, b)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert np.array_equal(now["state"][i][k], v)


def test_optimizer_grads_checked_before_any_block_moves():
    params, opt = _opt_setup(amsgrad=True)
    good = [np.ones_like(p) for p in params]
    opt.step(good)
    snap = _snapshot(params, opt)
    bad = list(good)
    bad[4] = np.ones(8, np.float32)  # wrong size, late in the list
    with pytest.raises(ValueError, match=r"grads\[4\] must have the shape"):
        opt.step(bad)
    _unchanged(params, opt, snap)
    with pytest.raises(ValueError, match="one entry per parameter"):
        opt.step(good[:-1])
    with pytest.raises(ValueError, match=r"grads\[0\] must have the shape"):
        opt.step(good[::-1])  # order of shapes wrong
    with pytest.raises(TypeError, match="grads must be a list"):
        opt.step(good[0])
    bad = list(good)
    bad[2] = good[2].astype(np.float64)
    with pytest.raises(TypeError, match=r"grads\[2\] must have dtype float32"):
        opt.step(bad)
    bad = list(good)
    bad[1] = opt.state[1]["exp_avg"]
    with pytest.raises(ValueError, match=r"grads\[1\] shares memory with exp_avgs\[1\]"):
        opt.step(bad)
    bad = list(good)
    bad[3] = params[3]  # a grad that is the parameter itself
    with pytest.raises(ValueError, match=r"grads\[3\] shares memory with params\[3\]"):
        opt.step(bad)
    _unchanged(params, opt, snap)
    # bad hyperparameters set between steps are caught at step time
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(good)
    _unchanged(params, opt, snap)


def test_optimizer_bad_params():
    rng = np.random.default_rng(0)
    p = rng.random(10).astype(np.float32)
    with pytest.raises(ValueError, match="duplicate parameters"):
        fastadam.Adam([p, p])
    with pytest.raises(ValueError, match="duplicate parameters"):
        fastadam.Adam([{"params": [p]}, {"params": [p]}])
    base = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        fastadam.Adam([base[:12], base[10:]])
    with pytest.raises(TypeError, match="float32 or float64"):
        fastadam.Adam([np.zeros(3, np.int64)])
    with pytest.raises(TypeError, match=r"exp_avgs\[1\] must have dtype float32|params\[1\]"):
        fastadam.Adam([np.zeros(3, np.float32), np.zeros(3, np.float64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        fastadam.Adam([np.zeros(10, np.float32)[::2]])
    with pytest.raises(ValueError, match="empty"):
        fastadam.Adam([])
    with pytest.raises(ValueError, match="betas"):
        fastadam.Adam([p], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="unknown param-group options"):
        fastadam.Adam([{"params": [p], "momentum": 0.9}])
    with pytest.raises(TypeError, match="params must be a list"):
        fastadam.Adam(p)
    opt = fastadam.Adam([p])
    with pytest.raises(ValueError, match="duplicate parameters"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    params, opt = _opt_setup()
    grads = [np.ones_like(p) for p in params]
    opt.step(grads)
    good = opt.state_dict()
    snap = _snapshot(params, opt)

    def bad(mutate, exc, match):
        sd = copy.deepcopy(good)
        mutate(sd)
        with pytest.raises(exc, match=match):
            opt.load_state_dict(sd)
        _unchanged(params, opt, snap)

    bad(lambda sd: sd.pop("state"), ValueError, "missing the key 'state'")
    bad(lambda sd: sd.pop("param_groups"), ValueError, "missing the key 'param_groups'")
    bad(
        lambda sd: sd["state"][2].pop("exp_avg_sq"),
        ValueError,
        r"\[2\] is missing \['exp_avg_sq'\]",
    )
    bad(
        lambda sd: sd["state"][0].update(exp_avg=np.zeros((4, 3), np.float32)),
        ValueError,
        r"\['state'\]\[0\]\['exp_avg'\] must have shape \(3, 4\)",
    )
    bad(
        lambda sd: sd["state"][1].update(exp_avg=np.zeros(5, np.float64)),
        ValueError,
        "dtype float32",
    )
    bad(lambda sd: sd["state"][1].update(step=-1), ValueError, "step")
    bad(lambda sd: sd["param_groups"][0].pop("betas"), ValueError, "missing")
    bad(lambda sd: sd["param_groups"][0].update(lr=-1), ValueError, "lr")
    bad(lambda sd: sd["param_groups"][0]["params"].pop(), ValueError, "parameters")
    bad(lambda sd: sd["state"].update({99: sd["state"][0]}), ValueError, "unknown parameters")
    with pytest.raises(TypeError):
        opt.load_state_dict([1, 2])
    # still works afterwards, and identically to a fresh load of the good dict
    opt.step(grads)


def test_read_only_grad_and_any_buffer_object_accepted():
    a = _arrays()
    a["grad"].flags.writeable = False  # grads are only read
    ref = {k: v.copy() for k, v in a.items()}
    _call(a)
    fastadam.reference.adam_step(
        ref["param"], ref["grad"], ref["exp_avg"], ref["exp_avg_sq"], step=1
    )
    assert np.array_equal(a["param"], ref["param"])
    # any buffer-protocol object works: array.array of doubles, memoryviews
    import array

    p = array.array("d", [1.0, 2.0])
    fastadam.adam_step(
        p,
        memoryview(array.array("d", [1.0, 1.0])),
        array.array("d", [0, 0]),
        array.array("d", [0, 0]),
        step=1,
        lr=0.5,
    )
    assert list(p) == pytest.approx([0.5, 1.5])


def test_ndarray_subclasses_and_byte_order():
    """Exact ndarrays take a fast path; subclasses and other buffers the general one, with
    the same checks."""

    class Sub(np.ndarray):
        pass

    a = _arrays()
    ref = {k: v.copy() for k, v in a.items()}
    a["param"] = a["param"].view(Sub)
    a["grad"] = a["grad"].view(Sub)
    _call(a)
    fastadam.reference.adam_step(
        ref["param"], ref["grad"], ref["exp_avg"], ref["exp_avg_sq"], step=1
    )
    assert np.array_equal(np.asarray(a["param"]), ref["param"])
    a = _arrays()
    a["grad"] = a["grad"].astype(a["grad"].dtype.newbyteorder())  # non-native byte order
    _rejects(TypeError, "grad must have dtype float32", a)
    a = _arrays()
    a["param"] = a["param"].view(Sub)[::2]
    for k in ("grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a[k] = a[k][:17]
    _rejects(ValueError, "param must be C-contiguous", a)
