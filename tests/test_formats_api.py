"""The NumPy API of the storage formats (docs/formats.md): 16-bit parameters, float32 master
weights, bfloat16 and 8-bit state, stochastic rounding, state_dict round trips and errors,
for every rule. (Bit-exact kernel-vs-reference tests on every SIMD path: test_formats.py.)
"""
import numpy as np
import pytest

from fastadam import _formats as F
from fastadam._rules import RULES


# ------------------------------------------------------------ option normalisation
@pytest.mark.parametrize("value, want", [
    (None, None), (np.float32, "float32"), ("float32", "float32"), (np.dtype("f4"), "float32"),
    ("bfloat16", "bfloat16"), ("8bit", "8bit"), (np.float64, "float64"),
    ("torch.bfloat16", "bfloat16"),
])
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


@pytest.mark.parametrize("value, exc", [
    (np.float16, ValueError), ("float16", ValueError), ("8BIT", ValueError),
    ("int8", ValueError), (np.int8, ValueError), ("nonsense", ValueError),
    (3, TypeError), ([1], TypeError), (object(), TypeError),
])
def test_state_dtype_refused(value, exc):
    with pytest.raises(exc, match="state_dtype"):
        F.check_state_dtype(value)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(rounding="up"), ValueError, "rounding"),
    (dict(rounding=1), TypeError, "rounding"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(master_weights="yes"), TypeError, "master_weights"),
])
def test_format_options_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        F.check_formats(**kw)


def test_format_options_normalised():
    f = F.check_formats(True, np.float32, "stochastic", np.uint64(2**64 - 1))
    assert f == F.Formats(True, "float32", "stochastic", 2**64 - 1) and f.stochastic
    assert f.as_dict() == {"master_weights": True, "state_dtype": "float32",
                           "rounding": "stochastic", "seed": 2**64 - 1}
    assert type(f.seed) is int
    assert F.check_formats() == F.Formats(False, None, "nearest", 0)


# ------------------------------------------------------------ per-parameter decisions
def test_rules_declare_signed_streams():
    want = {"adam": (True, False, False), "sgd": (True,), "adagrad": (False,),
            "rmsprop": (False, True, True), "adamax": (True, False), "nadam": (True, False),
            "radam": (True, False), "lion": (True,)}
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
    assert _pf("bfloat16") == (B, (B, B, B), False, "float32")       # as torch: the param's
    assert _pf("float16") == (H, (H, H, H), False, "float32")
    assert _pf("float16", master_weights=True) == (H, (N, N, N), True, "float32")
    assert _pf("float32", master_weights=True) == (N, (N, N, N), False, "float32")
    assert _pf("float16", state_dtype="bfloat16") == (H, (B, B, B), False, "float32")
    assert _pf("bfloat16", state_dtype="float32") == (B, (N, N, N), False, "float32")
    assert _pf("float32", state_dtype="8bit") == (N, (S, U, U), False, "float32")
    assert _pf("float32", 4095, state_dtype="8bit") == (N, (N, N, N), False, "float32")
    assert _pf("bfloat16", 4095, state_dtype="8bit") == (B, (N, N, N), False, "float32")
    assert _pf("bfloat16", 4096, "rmsprop", state_dtype="8bit", master_weights=True) == (
        B, (U, S, S), True, "float32")
    assert not _pf("float32", state_dtype="bfloat16").native


@pytest.mark.parametrize("dtype, kw", [
    ("float64", dict(state_dtype="8bit")), ("float64", dict(state_dtype="bfloat16")),
    ("float64", dict(state_dtype="float32")), ("float32", dict(state_dtype="float64")),
    ("int64", {}), ("float128", {}),
])
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
        "exp_avg": ("float32", (20, 30)), "exp_avg_sq": ("float32", (20, 30)),
        "max_exp_avg_sq": ("float32", (20, 30)), "master_param": ("float32", (20, 30)),
        "param_ema": ("float32", (20, 30))}
    pf = _pf("float32", 4097, state_dtype="8bit")
    assert F.state_layout(RULES["adam"], pf, (4097,), names=("exp_avg", "exp_avg_sq")) == {
        "exp_avg": ("uint8", (4097,)), "exp_avg_absmax": ("float32", (17,)),
        "exp_avg_sq": ("uint8", (4097,)), "exp_avg_sq_absmax": ("float32", (17,))}
    pf = _pf("float16", 10, "sgd")
    assert F.state_layout(RULES["sgd"], pf, (10,)) == {"momentum_buffer": ("float16", (10,))}
