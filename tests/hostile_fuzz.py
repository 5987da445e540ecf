"""Hostile fuzzing of every public entry point of fastadam (hypothesis).

This file is NOT collected by a plain ``pytest`` run (its name does not match
``python_files``). ``tests/test_hostile.py`` runs it in a subprocess, so that a crash
(a signal) or a hang fails a test there instead of killing the whole run. To run it
directly (pytest collects a file named on the command line whatever its name)::

    python -m pytest -q -p no:cacheprovider tests/hostile_fuzz.py            # everything
    python -m pytest -q -p no:cacheprovider tests/hostile_fuzz.py -k numpy_api
    python -m pytest -q -p no:cacheprovider tests/hostile_fuzz.py -k functional
    python -m pytest -q -p no:cacheprovider tests/hostile_fuzz.py -k torch

``FASTADAM_HOSTILE_EXAMPLES=10`` multiplies every test's number of examples (default 1:
about a minute for the whole file on two cores). Examples are derandomized, and
tests/test_hostile.py fixes PYTHONHASHSEED=0 (the draws also depend on the hash seed), so
a run is reproducible; set it when running this file directly to repeat a run, or vary it to
explore other examples. hypothesis prints every draw of a failing example.

The contract checked for every call:

* it returns, or raises TypeError or ValueError. (A ``HostileError`` raised by a hook of
  one of our own hostile objects -- ``__float__``, ``__len__``, an lr callable, ... -- may
  also come out unchanged: it is the caller's own exception. So may the
  NotImplementedError that fastadam.torch documents for capturable/differentiable.)
  Anything else -- another exception type, a warning turned into an error by the
  ``filterwarnings = error`` setting, a crash, a hang -- is a failure;
* on error every buffer involved (parameters, gradients, the optimizer's state arrays,
  a state_dict's arrays) is bit-identical to before, and the optimizer is still usable:
  the following valid step gives what an optimizer that never saw the bad call gives
  (a pure-NumPy model built on ``fastadam.reference`` for the NumPy API, a twin
  optimizer for the torch API);
* on success the result is the specification's (``fastadam.reference``), and a call
  the documentation rules out (a gradient sharing memory with a parameter, a
  non-integer step count, a read-only parameter, ...) must not have succeeded.
"""

from __future__ import annotations

import array
import copy
import faulthandler
import math
import numbers
import os
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastadam
from fastadam import reference

try:  # the torch tests skip without it; everything else must not need it
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None

SCALE = float(os.environ.get("FASTADAM_HOSTILE_EXAMPLES", "1"))
WATCHDOG_S = float(os.environ.get("FASTADAM_HOSTILE_WATCHDOG", "300"))


PHASES = None
if os.environ.get("FASTADAM_HOSTILE_NO_SHRINK"):
    from hypothesis import Phase

    PHASES = [Phase.explicit, Phase.reuse, Phase.generate]


def fuzz(n):
    if PHASES is not None:
        return settings(
            max_examples=max(1, int(n * SCALE)),
            deadline=None,
            derandomize=True,
            database=None,
            print_blob=False,
            phases=PHASES,
            suppress_health_check=list(HealthCheck),
        )
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(autouse=True)
def _watchdog():
    """A hang dumps every thread's traceback and exits (the outer test then fails)."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ============================================================== outcomes and checks
class HostileError(Exception):
    """Raised by the hooks of our hostile objects; may propagate unchanged."""


class MustReject(Exception):
    """The model's verdict: the documentation rules this call out."""


ALLOWED = (TypeError, ValueError, HostileError)


def attempt(what, fn, allowed=ALLOWED):
    """(True, result) or (False, the allowed exception); anything else fails the test."""
    try:
        return True, fn()
    except allowed as e:
        return False, e
    except _Collected:
        raise
    except Exception as e:
        msg = f"{what} raised {type(e).__name__}: {e} -- only TypeError or ValueError are allowed"
        if COLLECT:
            fail(msg, e)
        raise AssertionError(msg) from e


# FASTADAM_HOSTILE_COLLECT=<file>: record every failure (one line each) in <file> and go
# on generating instead of stopping at the first (to survey the distinct failures).
COLLECT = os.environ.get("FASTADAM_HOSTILE_COLLECT")


class _Collected(Exception):
    pass


_SEEN = set()
_CURRENT = None


def fail(msg, cause=None):
    if COLLECT:
        where = ""
        if cause is not None and cause.__traceback__ is not None:
            tb = cause.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            where = f" [at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}]"
        line = (
            f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: "
            f"{' '.join(str(msg).split())[:400]}{where}"
        )
        with open(COLLECT, "a") as f:
            f.write(line + "\n")
        key = re.sub(r"0x[0-9a-f]+|\d+", "#", line)
        if key not in _SEEN and _CURRENT is not None:
            _SEEN.add(key)
            with open(COLLECT + ".examples", "a") as f:
                f.write(line + "\n    " + "\n    ".join(_CURRENT.log) + "\n\n")
        raise _Collected()
    raise AssertionError(msg)


def collecting(fn):
    """In collect mode, an example that failed counts as passed (it was recorded)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _Collected:
            return None

    return wrapper


def same_values(a, b, what):
    """a and b hold the same values: bit for bit, except that NaN payloads may differ."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        fail(f"{what}: got {a.shape} {a.dtype}, expected {b.shape} {b.dtype}")
    if a.tobytes() == b.tobytes():
        return
    both_nan = np.isnan(a) & np.isnan(b)
    ua = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1) if a.size else a
    ub = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1) if b.size else b
    bad = [i for i in range(a.size) if not both_nan.flat[i] and ua[i].tobytes() != ub[i].tobytes()]
    if bad:
        i = bad[0]
        fail(
            f"{what}: {len(bad)} of {a.size} elements differ from the specification, "
            f"first at flat index {i}: got {a.flat[i]!r}, expected {b.flat[i]!r}"
        )


def _np_bytes(x):
    if isinstance(x, np.ndarray):
        return (x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, (bytearray, bytes)):
        return bytes(x)
    if isinstance(x, array.array):
        return x.tobytes()
    if torch is not None and isinstance(x, torch.Tensor):
        return t_bytes(x)
    raise TypeError(type(x))


def t_bytes(t):
    """The bytes (and dtype, shape) of a tensor's values, whatever its layout."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.coalesce() if t.layout == torch.sparse_coo else t
        try:
            return ("sparse", t_bytes(t.indices()), t_bytes(t.values()))
        except Exception:
            return ("sparse", repr(t))
    if t.device.type != "cpu":
        return (str(t.device), str(t.dtype), tuple(t.shape))
    shape, dtype = tuple(t.shape), str(t.dtype)
    if t.numel() == 0:
        return (dtype, shape, b"")
    t = t.resolve_conj().resolve_neg()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.clone(memory_format=torch.contiguous_format).reshape(-1)
    return (dtype, shape, t.view(torch.uint8).numpy().tobytes())


class Mem:
    """Every allocation an example makes; snapshots compare their bytes."""

    def __init__(self):
        self.roots, self._ids = [], set()

    def add(self, root):
        if id(root) not in self._ids:
            self._ids.add(id(root))
            self.roots.append(root)
        return root

    def add_tree(self, obj, depth=0):
        """Register every array (tensor) found in nested dicts/lists (a state_dict)."""
        if depth > 6:
            return
        if isinstance(obj, np.ndarray):
            self.add(obj)
        elif torch is not None and isinstance(obj, torch.Tensor):
            self.add(obj)
        elif isinstance(obj, dict):
            for v in list(obj.values()):
                self.add_tree(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.add_tree(v, depth + 1)

    def snap(self):
        return [_np_bytes(r) for r in self.roots]

    def check(self, before, what):
        after = self.snap()
        for i, (b, a) in enumerate(zip(before, after)):
            if a != b:
                r = self.roots[i]
                fail(
                    f"{what} failed but modified a buffer involved in the call (allocation "
                    f"#{i}: {type(r).__name__} {getattr(r, 'dtype', '')} "
                    f"{getattr(r, 'shape', '')})"
                )


# ========================================================================= garbage
class Raiser:
    """Every conversion and protocol hook raises HostileError."""

    def __init__(self, label="raiser"):
        self.label = label

    def __repr__(self):
        return f"{type(self).__name__}({self.label!r})"

    def _boom(self, *args, **kwargs):
        raise HostileError(f"{self!r}: a hook was called")

    __float__ = __int__ = __index__ = __complex__ = __bool__ = __len__ = __iter__ = _boom
    __getitem__ = __array__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = _boom
    __hash__ = object.__hash__


class UnhashableRaiser(Raiser):
    __hash__ = None


class RaisingReal(Raiser):
    """Claims to be a numbers.Real, but float() of it raises."""


class RaisingIntegral(Raiser):
    """Claims to be a numbers.Integral, but int() / index() of it raises."""


numbers.Real.register(RaisingReal)
numbers.Integral.register(RaisingIntegral)


class BadFloat(float):
    def __float__(self):
        raise HostileError("BadFloat.__float__")


class BadInt(int):
    def __int__(self):
        raise HostileError("BadInt.__int__")

    def __index__(self):
        raise HostileError("BadInt.__index__")


class BadLenPair:
    """len() says 2, iteration raises."""

    def __len__(self):
        return 2

    def __iter__(self):
        raise HostileError("BadLenPair.__iter__")

    def __getitem__(self, i):
        raise HostileError("BadLenPair.__getitem__")

    def __repr__(self):
        return "BadLenPair()"


class LyingPair:
    """len() says 2, iteration yields three items."""

    def __len__(self):
        return 2

    def __iter__(self):
        return iter((0.9, 0.999, 0.5))

    def __getitem__(self, i):
        return (0.9, 0.999, 0.5)[i]

    def __repr__(self):
        return "LyingPair()"


def lr_str(t):
    return "0.1"


def lr_nan(t):
    return float("nan")


def lr_negative(t):
    return -1e-3


def lr_array(t):
    return np.array([1e-3, 2e-3])


def lr_bool(t):
    return True


def lr_raises(t):
    raise HostileError("lr callable")


def lr_no_args():
    return 1e-3


def lr_np_true(t):
    return np.True_


def lr_huge(t):
    return 1e308


NAN, INF = float("nan"), float("inf")

_GARBAGE = [
    lambda: None,
    lambda: True,
    lambda: False,
    lambda: np.True_,
    lambda: np.False_,
    lambda: 0,
    lambda: 1,
    lambda: -1,
    lambda: 2,
    lambda: 3,
    lambda: 2**31,
    lambda: 2**53 + 1,
    lambda: 2**62,
    lambda: 2**62 + 1,
    lambda: 2**63 - 1,
    lambda: 2**63,
    lambda: 2**64,
    lambda: -(2**63),
    lambda: 10**30,
    lambda: -(10**30),
    lambda: 0.0,
    lambda: -0.0,
    lambda: 1.0,
    lambda: 0.5,
    lambda: 1.5,
    lambda: -1e-3,
    lambda: NAN,
    lambda: INF,
    lambda: -INF,
    lambda: 5e-324,
    lambda: 2.2250738585072014e-308,
    lambda: 1e-300,
    lambda: 1e308,
    lambda: 1.7976931348623157e308,
    lambda: 3.5e38,
    lambda: 1 - 2**-53,
    lambda: np.float16(0.5),
    lambda: np.float16(65504),
    lambda: np.float32(1e-3),
    lambda: np.float32(NAN),
    lambda: np.float64(0.9),
    lambda: np.float64(-0.0),
    lambda: np.longdouble(0.5),
    lambda: np.int8(-1),
    lambda: np.int32(2),
    lambda: np.int64(2**62),
    lambda: np.uint8(1),
    lambda: np.uint64(2**64 - 1),
    lambda: np.complex64(1),
    lambda: np.complex128(0.5 + 0j),
    lambda: np.datetime64("2020-01-01"),
    lambda: np.timedelta64(1, "s"),
    lambda: np.str_("paper"),
    lambda: np.str_("hat"),
    lambda: np.bytes_(b"paper"),
    lambda: np.void(b"\x00"),
    lambda: np.array(0.5),
    lambda: np.array(1),
    lambda: np.array(True),
    lambda: np.array("paper"),
    lambda: np.array([0.5]),
    lambda: np.array([[0.5]]),
    lambda: np.array([0.5, 0.25]),
    lambda: np.array([]),
    lambda: np.array(NAN),
    lambda: np.array(0.5, dtype=np.float16),
    lambda: np.array([0.9, 0.999]),
    lambda: Fraction(1, 3),
    lambda: Decimal("0.1"),
    lambda: Decimal("NaN"),
    lambda: Decimal("sNaN"),
    lambda: Decimal("-Infinity"),
    lambda: 1j,
    lambda: complex(0.5, 0),
    lambda: "0.1",
    lambda: "",
    lambda: "paper",
    lambda: "hat",
    lambda: "PAPER",
    lambda: " paper",
    lambda: b"paper",
    lambda: bytearray(b"hat"),
    lambda: memoryview(b"ab"),
    list,
    lambda: [0.9],
    lambda: [0.9, 0.999],
    lambda: (0.9, 0.999),
    lambda: (0.9, 0.999, 0.5),
    dict,
    lambda: {"a": 1},
    lambda: {0.9, 0.999},
    lambda: frozenset(),
    lambda: [[0.9, 0.999]],
    lambda: range(2),
    lambda: iter((0.9, 0.999)),
    lambda: (x for x in (0.9, 0.999)),
    lambda: ("0.9", "0.999"),
    lambda: (NAN, 0.999),
    lambda: (0.9, INF),
    lambda: (1.0, 0.5),
    lambda: (np.True_, 0.5),
    lambda: (Raiser("beta"), 0.999),
    lambda: Ellipsis,
    lambda: NotImplemented,
    lambda: object(),
    lambda: int,
    lambda: float,
    lambda: lr_str,
    lambda: lr_nan,
    lambda: lr_negative,
    lambda: lr_array,
    lambda: lr_bool,
    lambda: lr_raises,
    lambda: lr_no_args,
    lambda: lr_np_true,
    lambda: lr_huge,
    lambda: fastadam.InverseSqrtDecay(1e-3),
    lambda: fastadam.InverseSqrtDecay(-1.0),
    lambda: Raiser(),
    lambda: UnhashableRaiser(),
    lambda: RaisingReal(),
    lambda: RaisingIntegral(),
    lambda: BadFloat(0.5),
    lambda: BadInt(1),
    lambda: BadLenPair(),
    lambda: LyingPair(),
]


def _torch_garbage():
    if torch is None:
        return []
    return [
        lambda: torch.tensor(0.5),
        lambda: torch.tensor([0.5]),
        lambda: torch.tensor([[0.5]]),
        lambda: torch.tensor([0.5, 0.25]),
        lambda: torch.tensor(1),
        lambda: torch.tensor(True),
        lambda: torch.tensor(NAN),
        lambda: torch.tensor(0.5, requires_grad=True),
        lambda: torch.tensor(0.5, dtype=torch.float16),
        lambda: torch.tensor(0.5, dtype=torch.bfloat16),
        lambda: torch.tensor(1 + 1j),
        lambda: torch.empty(0),
        lambda: torch.empty((), device="meta"),
        lambda: torch.tensor(-1.0),
        lambda: torch.tensor(2.0**70),
        lambda: torch.tensor(3, dtype=torch.int64),
        lambda: torch.tensor(INF),
        lambda: (torch.tensor(0.9), 0.999),
        lambda: (torch.tensor([0.9]), torch.tensor(0.99)),
        lambda: (torch.tensor([0.9, 0.8]), torch.tensor(0.99)),
    ]


def garbage(torch_too=False):
    pool = _GARBAGE + (_torch_garbage() if torch_too else [])
    return st.one_of(
        st.sampled_from(pool).map(lambda f: f()),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**70), max_value=2**70),
    )


# valid values of every option (NumPy API)
VALID = {
    "lr": [1e-3, 0.1, 0.0, 1.0, 0.5, 7],
    "betas": [(0.9, 0.999), (0.0, 0.0), (0.5, 0.9), [0.8, 0.99], (0.9, 0.0)],
    "eps": [1e-8, 0.0, 1e-3, 1.0],
    "weight_decay": [0.0, 0.1, 1e-2, 0],
    "decoupled_weight_decay": [False, True],
    "amsgrad": [False, True],
    "maximize": [False, True],
    "bias_correction": [True, False],
    "eps_mode": ["paper", "hat"],
    "num_threads": [None, 1, 2, 3],
    "max_grad_norm": [None, None, 1.0, 0.05, 1e3],
    "skip_nonfinite": [False, True],
    "grad_scale": [1.0, 2.0, 0.5, 1024.0, 3],
    "step": [1, 2, 3, 10, 1000, 2**20, 2**62],
}
# lr may also be a callable of the step (NumPy API only)
VALID_LR_EXTRA = [
    lambda: fastadam.InverseSqrtDecay(0.01),
    lambda: np.float32(0.01),
    lambda: Fraction(1, 100),
]
OPTION_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "amsgrad",
    "maximize",
    "bias_correction",
    "eps_mode",
)


def valid_value(data, name, label=None, callables=True):
    choices = list(VALID[name])
    if name == "lr" and callables:
        choices += [f() for f in VALID_LR_EXTRA]
    return _copy(data.draw(st.sampled_from(choices), label=f"{label or name} (valid)"))


def value(data, name, bad, label=None, torch_too=False, callables=True):
    """A valid value of option `name`, or garbage when name is in `bad`."""
    if name in bad:
        return data.draw(garbage(torch_too), label=f"{label or name} (garbage)")
    return valid_value(data, name, label, callables)


SHAPES = [
    (),
    (0,),
    (1,),
    (3,),
    (7,),
    (8,),
    (17,),
    (33,),
    (64,),
    (100,),
    (2, 3),
    (3, 5, 2),
    (1000,),
    (4099,),
]
VALID_KINDS = ["ok", "ok", "ok", "ok", "memoryview", "subclass", "shared"]
# kinds that are valid buffers but unusual (accepting them is fine; then the result must
# be right)
ODD_KINDS = [
    "unaligned",
    "unaligned_half",
    "array_array",
    "masked",
    "mv_cast",
    "shared",
    "nonfinite",
]
BAD_KINDS = [
    "other_float",
    "float16",
    "longdouble",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "object",
    "structured",
    "datetime",
    "unicode",
    "0d",
    "strided",
    "reversed",
    "fortran",
    "readonly",
    "byteswapped",
    "bytearray",
    "bytes",
    "mv_bytes",
    "list",
    "scalar",
    "none",
    "empty",
    "longer",
    "2d",
    "alias",
    "raiser",
    "string",
    "dict",
    "nested_list",
]
# a float16 parameter is a valid one (computed in float32 beside float32 parameters:
# docs/formats.md, tests/test_formats_api.py); as a gradient or state array it is garbage
PARAM_BAD_KINDS = [k for k in BAD_KINDS if k != "float16"] + ODD_KINDS


class Ex:
    """One example: hypothesis data, an rng, the allocations, a shared pool per dtype."""

    def __init__(self, data):
        global _CURRENT
        _CURRENT = self
        self.log = []
        self.data = data
        self.rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        self.mem = Mem()
        self.pools = {}
        self.made = []  # buffers made so far (alias targets)

    def draw(self, strategy, label=None):
        v = self.data.draw(strategy, label=label)
        if COLLECT:
            self.log.append(f"{label}: {v!r}"[:200])
        return v

    def pick(self, seq, label):
        """One element of seq (by index: the elements need not be hashable)."""
        seq = list(seq)
        return seq[self.draw(st.integers(0, len(seq) - 1), label=label)]

    def values(self, shape, dtype, nonfinite=False):
        v = self.rng.uniform(-2.0, 2.0, size=shape)
        if nonfinite and v.size:
            idx = self.rng.integers(0, v.size, size=max(1, v.size // 4))
            v.flat[idx] = self.rng.choice([np.nan, np.inf, -np.inf], size=idx.size)
        return v.astype(dtype) if np.dtype(dtype).kind in "fc" else v

    def pool(self, dtype):
        if dtype not in self.pools:
            self.pools[dtype] = self.mem.add(np.zeros(16384, dtype))
        return self.pools[dtype]

    def array(self, kind, shape, dtype, label="buffer", finite=False):
        """Build a buffer of the given kind for a slot that wants shape and dtype."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        other = np.float64 if dtype == np.float32 else np.float32
        vals = self.values(shape, dtype)
        if kind == "nonfinite" and finite:
            kind = "ok"
        obj = None
        if kind == "ok":
            obj = self.mem.add(vals.copy())
        elif kind == "nonfinite":
            obj = self.mem.add(self.values(shape, dtype, nonfinite=True))
        elif kind == "memoryview":
            obj = memoryview(self.mem.add(vals.copy()))
        elif kind == "subclass":
            obj = self.mem.add(vals.copy()).view(SubArray)
        elif kind == "masked":
            obj = np.ma.masked_array(self.mem.add(vals.copy()), copy=False)
        elif kind == "shared":
            pool = self.pool(dtype)
            off = self.draw(
                st.integers(0, max(0, min(3 * n + 3, pool.size - n))),
                label=f"{label}: offset in the shared pool",
            )
            obj = pool[off : off + n].reshape(shape)
            obj[...] = vals
        elif kind in ("unaligned", "unaligned_half"):
            offset = 1 if kind == "unaligned" or dtype.itemsize == 4 else 4
            buf = self.mem.add(bytearray(dtype.itemsize * n + offset))
            obj = np.frombuffer(buf, dtype=dtype, count=n, offset=offset).reshape(shape)
            obj[...] = vals
        elif kind == "array_array":
            obj = self.mem.add(array.array("f" if dtype == np.float32 else "d", vals.ravel()))
        elif kind == "mv_cast":
            buf = self.mem.add(bytearray(dtype.itemsize * max(n, 1)))
            mv = memoryview(buf).cast("B")
            if n == 0:
                obj = memoryview(self.mem.add(np.zeros(shape, dtype)))
            else:
                obj = mv.cast(dtype.char, list(shape)) if len(shape) else mv.cast(dtype.char)
                np.asarray(obj)[...] = vals
        elif kind == "other_float":
            obj = self.mem.add(vals.astype(other))
        elif kind in (
            "float16",
            "longdouble",
            "int32",
            "int64",
            "uint8",
            "bool",
            "complex64",
            "complex128",
        ):
            obj = self.mem.add(self.rng.uniform(-2, 2, size=shape).astype(kind))
        elif kind == "object":
            obj = (
                np.array(vals.tolist(), dtype=object).reshape(shape)
                if n
                else np.zeros(shape, dtype=object)
            )
            self.mem.add(obj)
        elif kind == "structured":
            obj = self.mem.add(np.zeros(shape, dtype=[("a", dtype)]))
        elif kind == "datetime":
            obj = self.mem.add(np.zeros(shape, dtype="M8[s]"))
        elif kind == "unicode":
            obj = self.mem.add(np.zeros(shape, dtype="U3"))
        elif kind == "0d":
            obj = self.mem.add(np.array(0.5, dtype=dtype))
        elif kind == "strided":
            root = self.mem.add(np.zeros(tuple(shape) + (2,), dtype))
            obj = root[..., 0]
            obj[...] = vals
        elif kind == "reversed":
            if len(shape) == 0:
                obj = self.mem.add(vals.copy())
            else:
                root = self.mem.add(vals.copy())
                obj = root[..., ::-1]
        elif kind == "fortran":
            if len(shape) >= 2:
                obj = self.mem.add(np.asfortranarray(vals))
            else:
                root = self.mem.add(np.zeros((2, max(n, 1)), dtype))
                obj = root.T
        elif kind == "readonly":
            obj = self.mem.add(vals.copy())
            obj.flags.writeable = False
        elif kind == "byteswapped":
            obj = self.mem.add(vals.astype(dtype.newbyteorder()))
        elif kind == "bytearray":
            obj = self.mem.add(bytearray(dtype.itemsize * n))
        elif kind == "bytes":
            obj = bytes(dtype.itemsize * n)
        elif kind == "mv_bytes":
            obj = memoryview(self.mem.add(bytearray(dtype.itemsize * n)))
        elif kind == "list":
            obj = vals.ravel().tolist()
        elif kind == "nested_list":
            obj = vals.tolist()
        elif kind == "scalar":
            obj = 1.0
        elif kind == "none":
            obj = None
        elif kind == "empty":
            obj = self.mem.add(np.zeros((0,), dtype))
        elif kind == "longer":
            obj = self.mem.add(self.values((n + 1,), dtype))
        elif kind == "2d":
            obj = self.mem.add(vals.copy()).reshape((1,) + tuple(shape))
        elif kind == "alias":
            if self.made:
                obj = self.pick(self.made, f"{label}: aliases (index)")
            else:
                obj = self.mem.add(vals.copy())
        elif kind == "raiser":
            obj = Raiser(label)
        elif kind == "string":
            obj = "not an array"
        elif kind == "dict":
            obj = {"data": vals}
        else:  # pragma: no cover
            raise AssertionError(kind)
        if obj is not None and not isinstance(obj, (str, bytes, dict, list, float, Raiser)):
            self.made.append(obj)
        return obj

    def buffer(self, label, shape, dtype, bad=False, odd=True, finite=False, kinds=None):
        if kinds is None:
            kinds = (
                BAD_KINDS + ODD_KINDS if bad else (VALID_KINDS + ODD_KINDS if odd else VALID_KINDS)
            )
        kind = self.draw(st.sampled_from(kinds), label=f"{label} kind")
        return self.array(kind, shape, dtype, label, finite=finite)


class SubArray(np.ndarray):
    """A trivial ndarray subclass (not an exact ndarray: the slow path of the binding)."""


def as_array(x):
    """np.asarray(x) when that is a view of x's memory (not a copy), else None."""
    try:
        if isinstance(x, (str, bytes, dict, list, tuple, float, int)) or x is None:
            return None
        memoryview(x)
        return np.asarray(x)
    except Exception:
        return None


def overlaps(a, b):
    if a is None or b is None or a.size == 0 or b.size == 0:
        return False
    return bool(np.may_share_memory(a, b))


def check_writable_buffer(x, dtype, shape, what):
    """MustReject unless x is a writable C-contiguous float buffer of dtype and shape."""
    a = as_array(x)
    if a is None:
        raise MustReject(f"{what} is not a buffer")
    if a.dtype != dtype:
        raise MustReject(f"{what} has dtype {a.dtype}, not {np.dtype(dtype)}")
    if shape is not None and a.shape != tuple(shape):
        raise MustReject(f"{what} has shape {a.shape}, not {shape}")
    if not a.flags.c_contiguous:
        raise MustReject(f"{what} is not C-contiguous")
    if not a.flags.writeable:
        raise MustReject(f"{what} is read-only")
    return a


def spec_options(opts, t, grad_scale=1.0):
    """reference.step_constants of these options (lr callables evaluated at t), or
    MustReject naming why the specification refuses them."""
    o = dict(opts)
    try:
        betas = o["betas"]
        if not isinstance(betas, (tuple, list, np.ndarray)) and iter(betas) is betas:
            raise MustReject(f"betas {betas!r} is a one-shot iterator, not a pair")
        if callable(o["lr"]):
            o["lr"] = o["lr"](t)
        reference.step_constants(t, grad_scale=grad_scale, **o)
    except MustReject:
        raise
    except (TypeError, ValueError, HostileError, ArithmeticError) as e:
        raise MustReject(f"the specification rejects these options: {type(e).__name__}: {e}") from e
    return o


# ============================================================== the NumPy-API model
class NpModel:
    """What an optimizer is, in plain NumPy: parameters, moments, step counts, options;
    advanced with fastadam.reference."""

    def __init__(self, params, groups, group_of, dtype, max_grad_norm, skip_nonfinite):
        self.param_objs = params  # the user's objects (compared after each call)
        self.p = [np.array(np.asarray(q), copy=True) for q in params]
        self.m = [np.zeros_like(a) for a in self.p]
        self.v = [np.zeros_like(a) for a in self.p]
        self.vmax = [
            np.zeros_like(a) if groups[g]["amsgrad"] else None for a, g in zip(self.p, group_of)
        ]
        self.steps = [0] * len(params)
        self.step_count = 0
        self.groups = groups  # option dicts (no 'params')
        self.group_of = group_of
        self.dtype = np.dtype(dtype)
        self.max_grad_norm = max_grad_norm
        self.skip_nonfinite = skip_nonfinite

    @classmethod
    def of(cls, opt):
        """The model of a freshly built optimizer (its groups as it reports them)."""
        params, groups, group_of = [], [], []
        for gi, g in enumerate(opt.param_groups):
            groups.append({k: g[k] for k in OPTION_KEYS})
            for p in g["params"]:
                params.append(p)
                group_of.append(gi)
        a0 = np.asarray(params[0])
        return cls(params, groups, group_of, a0.dtype, opt.max_grad_norm, opt.skip_nonfinite)

    def clone(self):
        new = copy.copy(self)
        new.p = [a.copy() for a in self.p]
        new.m = [a.copy() for a in self.m]
        new.v = [a.copy() for a in self.v]
        new.vmax = [None if a is None else a.copy() for a in self.vmax]
        new.steps = list(self.steps)
        new.groups = [dict(g) for g in self.groups]
        new.group_of = list(self.group_of)
        new.param_objs = list(self.param_objs)
        return new

    def live(self, opt):
        """Every buffer the optimizer writes (for the aliasing rules)."""
        out = [as_array(q) for q in self.param_objs]
        for s in opt.state:
            out += [s[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in s]
        return out

    def prepare_step(self, opt, grads, grad_scale=1.0):
        """Check opt.step(grads, grad_scale) against the documentation (MustReject) and
        copy its inputs; returns finish(norm) -> (new model, expected return value),
        norm being the optimizer's last_grad_norm after the step (clipping trusts its
        bits for the coefficient, after checking it against NumPy's norm)."""
        n = len(self.p)
        if not isinstance(grads, (list, tuple)):
            raise MustReject(f"grads is a {type(grads).__name__}, not a list")
        if len(grads) != n:
            raise MustReject(f"{len(grads)} grads for {n} parameters")
        if isinstance(grad_scale, (bool, np.bool_)):
            raise MustReject("grad_scale is a bool")
        t = self.step_count + 1
        opts = [spec_options(g, t, grad_scale) for g in self.groups]
        live = self.live(opt)
        active = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            a = as_array(g)
            if a is None:
                raise MustReject(f"grads[{i}] is not a buffer")
            if a.dtype != self.dtype or a.shape != self.p[i].shape:
                raise MustReject(
                    f"grads[{i}] is {a.shape} {a.dtype}, the parameter "
                    f"{self.p[i].shape} {self.dtype}"
                )
            if not a.flags.c_contiguous:
                raise MustReject(f"grads[{i}] is not C-contiguous")
            if any(overlaps(a, b) for b in live):
                raise MustReject(f"grads[{i}] shares memory with a buffer the step writes")
            active.append((i, a.copy()))
        scale0 = float(grad_scale)
        new = self.clone()
        for i, _ in active:  # the specification's own refusals (a step count too big)
            _count(new.steps[i] + 1, f"the step count of parameter {i}", limit=2**62 + 1)

        def finish(opt_norm):
            finite = all(np.isfinite(a).all() for _, a in active)
            if self.skip_nonfinite and not finite:
                return new, False
            scale = scale0
            zero_grads = False  # an infinite norm clips by 0: g * (+-0), as the C core does
            if self.max_grad_norm is not None and active:
                with np.errstate(all="ignore"):
                    sumsq = sum(float(np.sum(a.astype(np.float64) ** 2)) for _, a in active)
                if not finite:
                    # torch reports the non-finite sum as the norm; the coefficient is
                    # then 0 (inf) or NaN (no clipping: NaN < 1 is false)
                    if opt_norm is None or not (
                        math.isnan(opt_norm) == math.isnan(sumsq) and not math.isfinite(opt_norm)
                    ):
                        fail(
                            f"last_grad_norm is {opt_norm!r} for gradients whose sum of "
                            f"squares is {sumsq!r}"
                        )
                    zero_grads = math.isinf(opt_norm)
                else:
                    norm = math.sqrt(sumsq) / scale0
                    if opt_norm is None or not math.isclose(
                        opt_norm, norm, rel_tol=1e-9, abs_tol=1e-300
                    ):
                        fail(f"last_grad_norm is {opt_norm!r}, NumPy's norm is {norm!r}")
                    coef = self.max_grad_norm / (opt_norm + 1e-6)
                    if coef < 1.0:
                        scale = scale0 / coef
            for i, a in active:
                gopts = opts[self.group_of[i]]
                if bool(gopts["amsgrad"]) and new.vmax[i] is None:
                    new.vmax[i] = np.zeros_like(new.p[i])  # switched on: starts at zero
                with np.errstate(all="ignore"):
                    if zero_grads:
                        a, scale = a * a.dtype.type(0.0), 1.0
                    reference.adam_step(
                        new.p[i],
                        a,
                        new.m[i],
                        new.v[i],
                        step=new.steps[i] + 1,
                        max_exp_avg_sq=new.vmax[i],
                        grad_scale=scale,
                        **gopts,
                    )
                new.steps[i] += 1
            new.step_count = t
            return new, True

        return finish

    def compare(self, opt, what):
        """The optimizer holds exactly what the model holds."""
        st_ = opt.state
        if len(st_) != len(self.p):
            fail(
                f"after {what}: the optimizer has state for {len(st_)} parameters, "
                f"expected {len(self.p)}"
            )
        for i, q in enumerate(self.param_objs):
            same_values(np.asarray(q), self.p[i], f"after {what}: params[{i}]")
            s = st_[i]
            same_values(s["exp_avg"], self.m[i], f"after {what}: state[{i}]['exp_avg']")
            same_values(s["exp_avg_sq"], self.v[i], f"after {what}: state[{i}]['exp_avg_sq']")
            if self.vmax[i] is not None:
                same_values(
                    s["max_exp_avg_sq"], self.vmax[i], f"after {what}: state[{i}]['max_exp_avg_sq']"
                )
            if s["step"] != self.steps[i]:
                fail(f"after {what}: state[{i}]['step'] is {s['step']!r}, expected {self.steps[i]}")
        sc = opt.state_dict()["step_count"]
        if sc != self.step_count:
            fail(f"after {what}: step_count is {sc!r}, expected {self.step_count}")


def np_call(ex, opt, model, what, call, predict, must_succeed=False, finish=None):
    """Run call() against the model's prediction (made before the call); returns whether
    it succeeded. predict() -> (new model, expected result) or raises MustReject; with
    finish, predict() returns finish's argument... see np_step."""
    before = ex.mem.snap()
    try:
        pred = predict()
    except MustReject as e:
        pred = e
    ok, res = attempt(what, call)
    if ok:
        if isinstance(pred, MustReject):
            fail(f"{what} succeeded, but must have been refused: {pred}")
        new, expected = finish(pred) if finish else pred
        if res != expected:
            fail(f"{what} returned {res!r}, expected {expected!r}")
        model.__dict__.update(new.__dict__)
    else:
        if must_succeed and not isinstance(pred, MustReject):
            fail(f"{what} is valid but raised {type(res).__name__}: {res}")
        ex.mem.check(before, what)
    model.compare(opt, what)
    return ok


def np_step(ex, opt, model, grads, grad_scale=1.0, what="step", must_succeed=False):
    """opt.step(grads, grad_scale) checked against the model."""
    return np_call(
        ex,
        opt,
        model,
        what,
        lambda: opt.step(grads, grad_scale=grad_scale),
        lambda: model.prepare_step(opt, grads, grad_scale),
        must_succeed,
        finish=lambda fin: fin(opt.last_grad_norm),
    )


def valid_grads(ex, model, allow_none=True, finite=None):
    finite = model.max_grad_norm is not None if finite is None else finite
    grads = []
    for i, a in enumerate(model.p):
        if allow_none and ex.draw(st.integers(0, 4), label=f"grads[{i}] None?") == 0:
            grads.append(None)
            continue
        kind = ex.draw(
            st.sampled_from(["ok", "ok", "ok", "nonfinite", "memoryview"]),
            label=f"grads[{i}] kind (valid)",
        )
        g = ex.array(kind, a.shape, a.dtype, f"grads[{i}]", finite=finite)
        ex.made.pop()  # valid grads are no alias targets
        grads.append(g)
    return grads


def valid_np_step(ex, opt, model, what):
    grads = valid_grads(ex, model)
    gs = valid_value(ex.data, "grad_scale", label=f"{what}: grad_scale")
    return np_step(ex, opt, model, grads, gs, what=what, must_succeed=True)


def build_np_opt(ex, odd=False):
    """A valid optimizer (and its model) over 1-5 parameters in 1-2 groups."""
    dtype = ex.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    cls = ex.draw(st.sampled_from([fastadam.Adam, fastadam.AdamW]), label="class")
    ngroups = ex.draw(st.integers(1, 2), label="groups")
    groups = []
    for gi in range(ngroups):
        k = ex.draw(st.integers(1, 3), label=f"group {gi}: parameters")
        params = []
        for j in range(k):
            shape = ex.draw(st.sampled_from(SHAPES), label=f"group {gi} params[{j}] shape")
            kind = ex.draw(
                st.sampled_from(
                    ["ok", "ok", "memoryview", "subclass"] + (["shared"] if False else [])
                ),
                label=f"group {gi} params[{j}] kind",
            )
            params.append(ex.array(kind, shape, dtype, f"group {gi} params[{j}]"))
        g = {"params": params}
        for key in ex.draw(
            st.lists(st.sampled_from(OPTION_KEYS), max_size=4, unique=True),
            label=f"group {gi}: options set",
        ):
            g[key] = valid_value(ex.data, key, f"group {gi} {key}")
        groups.append(g)
    kwargs = {}
    for key in ex.draw(
        st.lists(
            st.sampled_from(OPTION_KEYS + ("max_grad_norm", "skip_nonfinite", "num_threads")),
            max_size=5,
            unique=True,
        ),
        label="defaults set",
    ):
        kwargs[key] = valid_value(ex.data, key, f"default {key}")
    arg = groups if ngroups > 1 or ex.draw(st.booleans(), label="as dicts") else groups[0]["params"]
    ok, opt = attempt("building a valid optimizer", lambda: cls(arg, **kwargs))
    if not ok:
        fail(
            f"{cls.__name__}({arg!r}, **{kwargs!r}) is valid but raised {type(opt).__name__}: {opt}"
        )
    model = NpModel.of(opt)
    return opt, model


# ==================================================================== NumPy API tests
def _elements(shape):
    """The element count shape asks for, or None when shape is not a plain shape."""
    try:
        dims = [shape] if not isinstance(shape, (tuple, list)) else list(shape)
        dims = [int(d) for d in dims if not isinstance(d, (float, str, bytes, bool))]
        return math.prod(dims)
    except Exception:
        return None


@fuzz(250)
@given(data=st.data())
@collecting
def test_numpy_api_aligned_zeros(data):
    bad = data.draw(
        st.lists(st.sampled_from(["shape", "dtype", "align"]), max_size=3, unique=True),
        label="garbage args",
    )
    if "shape" in bad:
        shape = data.draw(
            st.one_of(
                garbage(),
                st.lists(st.one_of(st.integers(-3, 5), garbage()), max_size=3),
                st.tuples(
                    st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64, -1, 0]),
                    st.sampled_from([2**31, 2**32, 2**33, 3, 0, -2]),
                ),
            ),
            label="shape",
        )
    else:
        shape = data.draw(
            st.one_of(st.integers(0, 50), st.lists(st.integers(0, 6), max_size=3).map(tuple)),
            label="shape",
        )
    if "dtype" in bad:
        dtype = data.draw(
            st.one_of(
                garbage(),
                st.sampled_from(
                    [
                        np.int8,
                        np.bool_,
                        np.complex64,
                        "O",
                        [("a", "f4")],
                        "U3",
                        "M8[s]",
                        "V3",
                        np.float16,
                        "f4,f8",
                        ">f8",
                        "float32",
                        None,
                    ]
                ),
            ),
            label="dtype",
        )
    else:
        dtype = data.draw(st.sampled_from([np.float32, np.float64, "f4", "d"]), label="dtype")
    if "align" in bad:
        align = data.draw(
            st.one_of(garbage(), st.sampled_from([0, -64, 3, 2**40, 2**63, 1])), label="align"
        )
    else:
        align = data.draw(st.sampled_from([64, 1, 2, 16, 4096, 128]), label="align")
    # a plain, representable but huge request would just be a MemoryError: skip those
    n = _elements(shape)
    try:
        isz = np.dtype(dtype).itemsize
    except Exception:
        isz = 8
    al = align if isinstance(align, int) and not isinstance(align, bool) else 0
    if n is not None and 2**27 < abs(n) * max(isz, 1) + abs(al) < 2**63:
        return
    if 2**27 < abs(al) < 2**63:
        return
    ok, r = attempt(
        f"aligned_zeros({shape!r}, {dtype!r}, {align!r})",
        lambda: fastadam.aligned_zeros(shape, dtype, align),
    )
    if not ok:
        return
    # success: it must be what np.zeros(shape, dtype) is, aligned
    ok2, ref = attempt("np.zeros", lambda: np.zeros(shape, dtype))
    if not ok2:
        fail(
            f"aligned_zeros({shape!r}, {dtype!r}, {align!r}) returned an array although "
            f"np.zeros refuses that shape/dtype ({type(ref).__name__}: {ref})"
        )
    if not isinstance(r, np.ndarray) or r.shape != ref.shape or r.dtype != ref.dtype:
        fail(
            f"aligned_zeros({shape!r}, {dtype!r}, {align!r}) returned "
            f"{type(r).__name__} {getattr(r, 'shape', '')} {getattr(r, 'dtype', '')}, "
            f"np.zeros gives {ref.shape} {ref.dtype}"
        )
    if not (isinstance(align, numbers.Integral) and int(align) >= 1):
        fail(f"aligned_zeros accepted align={align!r}: not a positive integer")
    if not (r.flags.c_contiguous and r.flags.writeable):
        fail("aligned_zeros returned a non-contiguous or read-only array")
    if r.size and r.ctypes.data % int(align):
        fail(f"aligned_zeros(align={align!r}) returned data at {r.ctypes.data:#x}")
    if r.tobytes() != bytes(r.nbytes):
        fail("aligned_zeros returned non-zero memory")


CTOR_ARGS = OPTION_KEYS + ("num_threads", "max_grad_norm", "skip_nonfinite")


def _garbage_params_container(ex, params):
    choice = ex.draw(
        st.sampled_from(
            [
                "none",
                "array",
                "dict",
                "string",
                "empty",
                "generator",
                "tuple",
                "int",
                "mixed",
                "nested",
                "raiser",
                "set_of_ids",
                "bytes",
            ]
        ),
        label="params container",
    )
    return {
        "none": None,
        "array": params[0] if params else np.zeros(3, np.float32),
        "dict": {"params": params, "bogus": 1} if params else {},
        "string": "params",
        "empty": [],
        "generator": (p for p in params),
        "tuple": tuple(params),
        "int": 3,
        "mixed": [{"params": params[:1]}] + params[1:],
        "nested": [params],
        "raiser": Raiser("params"),
        "set_of_ids": {id(p) for p in params},
        "bytes": b"abc",
    }[choice]


@fuzz(300)
@given(data=st.data())
@collecting
def test_numpy_api_construct(data):
    ex = Ex(data)
    cls = ex.draw(st.sampled_from([fastadam.Adam, fastadam.AdamW]), label="class")
    bad = ex.draw(
        st.lists(
            st.sampled_from(CTOR_ARGS + ("param", "param", "group", "container")),
            max_size=3,
            unique=True,
        ),
        label="garbage args",
    )
    dtype = ex.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    ngroups = ex.draw(st.integers(0, 2), label="groups (0: a flat list)")
    groups = []
    for gi in range(max(ngroups, 1)):
        k = ex.draw(st.integers(1, 3), label=f"group {gi}: parameters")
        params = []
        for j in range(k):
            shape = ex.draw(st.sampled_from(SHAPES), label=f"group {gi} params[{j}] shape")
            is_bad = "param" in bad and ex.draw(st.booleans(), label="this one garbage?")
            params.append(
                ex.buffer(
                    f"group {gi} params[{j}]",
                    shape,
                    dtype,
                    bad=is_bad,
                    kinds=PARAM_BAD_KINDS if is_bad else None,
                )
            )
        g = {"params": params}
        for key in ex.draw(
            st.lists(st.sampled_from(OPTION_KEYS), max_size=3, unique=True),
            label=f"group {gi}: options set",
        ):
            g[key] = value(ex.data, key, bad if "group" in bad else (), f"group {gi} {key}")
        if "group" in bad:
            how = ex.draw(
                st.sampled_from(
                    [
                        "unknown key",
                        "no params",
                        "params garbage",
                        "not a dict",
                        "params array",
                        "params empty",
                        "options",
                    ]
                ),
                label=f"group {gi} garbage",
            )
            if how == "unknown key":
                g[ex.draw(st.sampled_from(["foo", 0, None, ("lr",), "params ", "LR"]))] = 1
            elif how == "no params":
                del g["params"]
            elif how == "params garbage":
                g["params"] = ex.draw(garbage(), label="group params")
            elif how == "not a dict":
                g = ex.draw(garbage(), label="group")
            elif how == "params array":
                g["params"] = params[0]
            elif how == "params empty":
                g["params"] = []
        groups.append(g)
    if ngroups == 0:
        arg = (
            groups[0]["params"] if isinstance(groups[0], dict) and "params" in groups[0] else groups
        )
    else:
        arg = groups
    if "container" in bad:
        arg = _garbage_params_container(ex, arg if isinstance(arg, list) else [])
    kwargs = {}
    for key in CTOR_ARGS:
        if key in bad or ex.draw(st.integers(0, 3), label=f"pass {key}?") == 0:
            kwargs[key] = value(ex.data, key, bad)
    before = ex.mem.snap()
    ok, opt = attempt(f"{cls.__name__}(params, **{kwargs!r})", lambda: cls(arg, **kwargs))
    ex.mem.check(before, "construction") if not ok else None
    if not ok:
        return
    after = ex.mem.snap()
    if after != before:
        fail("a successful construction modified a parameter")
    # it was accepted: it must be a valid optimizer by the documentation...
    flat = [p for g in opt.param_groups for p in g["params"]]
    arrays = []
    for i, p in enumerate(flat):
        try:
            dtype = getattr(as_array(p), "dtype", None)  # None: refused as no buffer
            arrays.append(check_writable_buffer(p, dtype, None, f"params[{i}]"))
        except MustReject as e:
            fail(f"construction accepted an invalid parameter: {e}")
    # float64 parameters alone, or float32 and 16-bit ones together (16-bit parameters are
    # computed in float32: docs/formats.md)
    dtypes = {a.dtype.name for a in arrays}
    if dtypes != {"float64"} and not dtypes <= {"float32", "float16", "bfloat16"}:
        fail(f"construction accepted parameters of dtypes {sorted(dtypes)}")
    for i in range(len(arrays)):
        for j in range(i):
            if overlaps(arrays[i], arrays[j]):
                fail(f"construction accepted params[{j}] and params[{i}] sharing memory")
    for gi, g in enumerate(opt.param_groups):
        options = {k: g[k] for k in OPTION_KEYS}
        if callable(options["lr"]):
            # a schedule is documented to be evaluated at each step, not at construction:
            # a callable that fails or returns garbage is refused by the step (test_numpy_api_step)
            options["lr"] = 1.0
        try:
            spec_options(options, 1)
        except MustReject as e:
            fail(f"construction accepted invalid options in param group {gi}: {e}")
    for name, chk in (
        (
            "max_grad_norm",
            lambda v: (
                v is None
                or (
                    isinstance(v, numbers.Real)
                    and not isinstance(v, bool)
                    and math.isfinite(v)
                    and v > 0
                )
            ),
        ),
    ):
        if not chk(getattr(opt, name)):
            fail(f"construction accepted {name}={getattr(opt, name)!r}")
    # ... and work like the specification for two steps
    model = NpModel.of(opt)
    for k in range(2):
        grads = valid_grads(ex, model)
        np_step(ex, opt, model, grads, 1.0, what=f"valid step {k + 1} after construction")


GRAD_CONTAINERS = [
    "list",
    "list",
    "list",
    "list",
    "tuple",
    "generator",
    "dict",
    "array",
    "none",
    "short",
    "long",
    "string",
    "object_array",
    "raiser",
]


@fuzz(300)
@given(data=st.data())
@collecting
def test_numpy_api_step(data):
    ex = Ex(data)
    opt, model = build_np_opt(ex)
    for k in range(ex.draw(st.integers(0, 2), label="valid steps before")):
        valid_np_step(ex, opt, model, f"valid step {k + 1}")
    action = ex.draw(
        st.sampled_from(["grads", "grads", "grads", "grad_scale", "group_option", "attribute"]),
        label="hostile action",
    )
    live = model.live(opt)
    grads = valid_grads(ex, model)
    grad_scale = 1.0
    restore = None
    if action == "grads":
        n_bad = ex.draw(st.integers(1, len(grads)), label="garbage grads")
        which = ex.draw(
            st.lists(st.integers(0, len(grads) - 1), min_size=1, max_size=n_bad, unique=True),
            label="garbage positions",
        )
        for i in which:
            how = ex.draw(
                st.sampled_from(
                    [
                        "kind",
                        "kind",
                        "alias_param",
                        "alias_state",
                        "view_of_param",
                        "overlap_param",
                        "same_grad",
                    ]
                ),
                label=f"grads[{i}] garbage",
            )
            shape, dtype = model.p[i].shape, model.dtype
            if how == "kind":
                grads[i] = ex.buffer(
                    f"grads[{i}]", shape, dtype, bad=True, finite=model.max_grad_norm is not None
                )
            elif how == "alias_param":
                grads[i] = ex.pick(model.param_objs, "a parameter (index)")
            elif how == "alias_state":
                grads[i] = ex.pick(
                    live[len(model.p) :] or [model.param_objs[i]], "a state array (index)"
                )
            elif how == "view_of_param":
                grads[i] = np.asarray(model.param_objs[i]).view()
            elif how == "overlap_param":
                a = np.asarray(model.param_objs[i])
                base = a.base if isinstance(a.base, np.ndarray) else a
                grads[i] = (
                    base.reshape(-1)[: a.size][::-1].copy().reshape(shape)
                    if base.size < 2
                    else base.reshape(-1)[1:][: a.size]
                )
            elif how == "same_grad" and grads:
                grads[i] = ex.pick(
                    [g for g in grads if g is not None] or [None], "another grad (index)"
                )
        cont = ex.draw(st.sampled_from(GRAD_CONTAINERS), label="grads container")
        grads = {
            "list": grads,
            "tuple": tuple(grads),
            "generator": (g for g in grads),
            "dict": dict(enumerate(grads)),
            "array": grads[0],
            "none": None,
            "short": grads[:-1],
            "long": grads + [grads[0]],
            "string": "grads",
            "object_array": _object_array(grads),
            "raiser": Raiser("grads"),
        }[cont]
    elif action == "grad_scale":
        grad_scale = ex.draw(garbage(), label="grad_scale (garbage)")
    elif action == "group_option":
        gi = ex.draw(st.integers(0, len(opt.param_groups) - 1), label="group")
        key = ex.draw(st.sampled_from(OPTION_KEYS), label="option")
        val = ex.draw(garbage(), label="value (garbage)")
        old = opt.param_groups[gi][key]
        opt.param_groups[gi][key] = val
        model.groups[gi][key] = val
        restore = ("group", gi, key, old)
    else:
        name = ex.draw(
            st.sampled_from(["num_threads", "max_grad_norm", "skip_nonfinite"]), label="attribute"
        )
        val = ex.draw(garbage(), label="value (garbage)")
        old = getattr(opt, name)
        ok, _ = attempt(f"opt.{name} = {val!r}", lambda: setattr(opt, name, val))
        if ok:
            restore = ("attr", name, old)
            if name == "max_grad_norm" and not (val is None or _pos_real(val)):
                model._bad_attr = f"max_grad_norm = {val!r}"
            elif name == "num_threads" and not (
                val is None
                or (
                    isinstance(val, numbers.Integral)
                    and not isinstance(val, (bool, np.bool_))
                    and val >= 1
                )
            ):
                model._bad_attr = f"num_threads = {val!r}"
            elif name == "skip_nonfinite" and not _flag_like(val):
                model._bad_attr = f"skip_nonfinite = {val!r}"
            elif name == "skip_nonfinite":
                model.skip_nonfinite = bool(val)
            elif name == "max_grad_norm":
                model.max_grad_norm = val
    if getattr(model, "_bad_attr", None):
        bad_attr = model._bad_attr
        model._bad_attr = None
        before = ex.mem.snap()
        ok, _res = attempt(
            "step after setting a garbage attribute", lambda: opt.step(grads, grad_scale=grad_scale)
        )
        if ok:
            fail(
                f"a step with {bad_attr} succeeded: the attribute must be refused "
                f"(when set or at the step)"
            )
        ex.mem.check(before, f"step with {bad_attr}")
        model.compare(opt, f"step with {bad_attr}")
    else:
        np_step(ex, opt, model, grads, grad_scale, what=f"hostile step ({action})")
    if restore is not None:
        if restore[0] == "group":
            _, gi, key, old = restore
            opt.param_groups[gi][key] = old
            model.groups[gi][key] = old
        else:
            _, name, old = restore
            setattr(opt, name, old)
            model.max_grad_norm = opt.max_grad_norm
            model.skip_nonfinite = opt.skip_nonfinite
    # still usable, and as if the hostile call had not been made (if it failed)
    valid_np_step(ex, opt, model, "the valid step after the hostile one")


def _pos_real(v):
    """v is a real number (not a bool), finite and > 0."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return False
    try:
        f = float(v)
    except Exception:
        return False
    return math.isfinite(f) and f > 0


def _object_array(grads):
    a = np.empty(len(grads), dtype=object)
    for i, g in enumerate(grads):
        a[i] = g
    return a


@fuzz(200)
@given(data=st.data())
@collecting
def test_numpy_api_add_param_group(data):
    ex = Ex(data)
    opt, model = build_np_opt(ex)
    for k in range(ex.draw(st.integers(0, 2), label="valid steps before")):
        valid_np_step(ex, opt, model, f"valid step {k + 1}")
    n_before = len(opt.param_groups)
    bad = ex.draw(
        st.lists(
            st.sampled_from(["param", "option", "structure", "duplicate", "overlap", "dtype"]),
            max_size=2,
            unique=True,
        ),
        label="garbage",
    )
    k = ex.draw(st.integers(1, 3), label="new parameters")
    params = []
    for j in range(k):
        shape = ex.draw(st.sampled_from(SHAPES[:10]), label=f"new params[{j}] shape")
        params.append(
            ex.buffer(
                f"new params[{j}]",
                shape,
                model.dtype,
                bad="param" in bad and j == k - 1,
                kinds=PARAM_BAD_KINDS if "param" in bad and j == k - 1 else None,
            )
        )
    if "duplicate" in bad:
        params[ex.draw(st.integers(0, k - 1))] = ex.pick(
            model.param_objs, "an existing parameter (index)"
        )
    if "overlap" in bad:
        live = model.live(opt)
        tgt = ex.pick([a for a in live if a.size] or [live[0]], "memory to alias (index)")
        params[-1] = tgt.reshape(-1)[: max(tgt.size - 1, 0)] if tgt.size > 1 else tgt.view()
    if "dtype" in bad:
        other = np.float64 if model.dtype == np.float32 else np.float32
        params[-1] = ex.array("ok", (3,), other, "other-dtype parameter")
    group = {"params": params}
    for key in ex.draw(
        st.lists(st.sampled_from(OPTION_KEYS), max_size=3, unique=True), label="options set"
    ):
        group[key] = value(ex.data, key, OPTION_KEYS if "option" in bad else (), key)
    if "structure" in bad:
        how = ex.draw(
            st.sampled_from(
                [
                    "not a dict",
                    "no params",
                    "params garbage",
                    "params empty",
                    "unknown key",
                    "params array",
                ]
            ),
            label="structure garbage",
        )
        if how == "not a dict":
            group = ex.draw(st.one_of(garbage(), st.just(params)), label="group")
        elif how == "no params":
            del group["params"]
        elif how == "params garbage":
            group["params"] = ex.draw(garbage(), label="params")
        elif how == "params empty":
            group["params"] = []
        elif how == "unknown key":
            group["bogus"] = 1
        else:
            group["params"] = params[0]

    def predict():
        if not isinstance(group, dict):
            raise MustReject("the group is not a dict")
        if "params" not in group:
            raise MustReject("the group has no 'params'")
        ps = group["params"]
        if isinstance(ps, np.ndarray):
            ps = [ps]
        elif not isinstance(ps, (list, tuple)):
            raise MustReject("'params' is not a list")
        if not ps:
            raise MustReject("'params' is empty")
        unknown = [key for key in group if key not in OPTION_KEYS and key != "params"]
        if unknown:
            raise MustReject(f"unknown keys {unknown}")
        new = model.clone()
        opts = {key: group.get(key, opt.defaults[key]) for key in OPTION_KEYS}
        spec_options(opts, model.step_count + 1)
        existing = model.live(opt)
        arrays = []
        for j, p in enumerate(ps):
            if any(p is q for q in model.param_objs) or any(p is q for q in ps[:j]):
                raise MustReject("a parameter appears twice")
            a = check_writable_buffer(p, model.dtype, None, f"new params[{j}]")
            if any(overlaps(a, b) for b in existing + arrays):
                raise MustReject(f"new params[{j}] shares memory with another buffer")
            arrays.append(a)
        gi = len(new.groups)
        new.groups.append(dict(opts))
        for p, a in zip(ps, arrays):
            new.param_objs.append(p)
            new.p.append(a.copy())
            new.m.append(np.zeros_like(a))
            new.v.append(np.zeros_like(a))
            new.vmax.append(np.zeros_like(a) if opts["amsgrad"] else None)
            new.steps.append(0)
            new.group_of.append(gi)
        return new, None

    ok = np_call(ex, opt, model, "add_param_group", lambda: opt.add_param_group(group), predict)
    if not ok and len(opt.param_groups) != n_before:
        fail(f"a failed add_param_group left {len(opt.param_groups)} groups (had {n_before})")
    valid_np_step(ex, opt, model, "the valid step after add_param_group")


STEP_GARBAGE = [
    -1,
    1.5,
    NAN,
    INF,
    2**62 - 1,
    2**62,
    2**62 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
    np.int64(5),
    np.uint64(2**64 - 1),
    np.int64(-1),
    np.float64(3.0),
    True,
    False,
    np.True_,
    "3",
    None,
    3.0,
    np.array(3),
    np.array([3]),
    BadInt(3),
    RaisingIntegral(),
    Fraction(3, 1),
    Decimal(3),
]


def _mutate_state_dict(ex, sd, model):
    """One hostile change to a state_dict; returns a description."""
    where = ex.draw(
        st.sampled_from(
            [
                "top",
                "groups",
                "group",
                "state",
                "entry",
                "entry",
                "step",
                "step",
                "array",
                "array",
                "step_count",
            ]
        ),
        label="state_dict: where",
    )
    if where == "top":
        how = ex.draw(
            st.sampled_from(
                ["replace", "del state", "del param_groups", "del step_count", "extra key"]
            ),
            label="top: how",
        )
        if how == "replace":
            return "replace", ex.draw(
                st.one_of(garbage(), st.just([sd]), st.just(list(sd.items()))), label="sd"
            )
        if how == "extra key":
            sd[ex.draw(st.sampled_from(["extra", 0, None]))] = 1
        else:
            sd.pop(how[4:], None)
    elif where == "groups":
        how = ex.draw(
            st.sampled_from(["garbage", "drop", "duplicate", "tuple", "dict"]),
            label="param_groups: how",
        )
        g = sd["param_groups"]
        sd["param_groups"] = {
            "garbage": lambda: ex.draw(garbage(), label="param_groups"),
            "drop": lambda: g[:-1],
            "duplicate": lambda: g + g[-1:],
            "tuple": lambda: tuple(g),
            "dict": lambda: dict(enumerate(g)),
        }[how]()
    elif where == "group":
        g = ex.pick(sd["param_groups"], "which group")
        how = ex.draw(
            st.sampled_from(["option", "option", "del option", "params", "extra", "del params"]),
            label="group: how",
        )
        if how == "option":
            key = ex.draw(st.sampled_from(OPTION_KEYS), label="option")
            g[key] = ex.draw(garbage(), label=f"{key} (garbage)")
        elif how == "del option":
            del g[ex.draw(st.sampled_from(OPTION_KEYS), label="option")]
        elif how == "params":
            g["params"] = ex.draw(
                st.one_of(
                    garbage(),
                    st.just(list(g["params"])[::-1]),
                    st.just(list(g["params"]) * 2),
                    st.just([str(i) for i in g["params"]]),
                    st.just([float(i) for i in g["params"]]),
                    st.just([0] * len(g["params"])),
                    st.just([i + 100 for i in g["params"]]),
                ),
                label="group params",
            )
        elif how == "extra":
            g["bogus"] = 1
        else:
            del g["params"]
    elif where == "state":
        how = ex.draw(
            st.sampled_from(["garbage", "unknown key", "drop entry", "list"]), label="state: how"
        )
        if how == "garbage":
            sd["state"] = ex.draw(garbage(), label="state")
        elif how == "unknown key":
            sd["state"][
                ex.draw(
                    st.sampled_from(
                        [len(model.p), -1, "0", 0.5, None, (0,), True, 10**20, np.int64(0)]
                    ),
                    label="key",
                )
            ] = {"step": 1, "exp_avg": model.m[0].copy(), "exp_avg_sq": model.v[0].copy()}
        elif how == "drop entry" and sd["state"]:
            del sd["state"][ex.draw(st.sampled_from(sorted(sd["state"])), label="entry")]
        elif how == "list":
            sd["state"] = list(sd["state"].values())
    elif sd["state"] and where in ("entry", "step", "array"):
        key = ex.draw(st.sampled_from(sorted(sd["state"])), label="which entry")
        entry = sd["state"][key]
        if where == "entry":
            how = ex.draw(
                st.sampled_from(
                    [
                        "garbage",
                        "del step",
                        "del exp_avg",
                        "del exp_avg_sq",
                        "del max_exp_avg_sq",
                        "extra",
                    ]
                ),
                label="entry: how",
            )
            if how == "garbage":
                sd["state"][key] = ex.draw(garbage(), label="entry")
            elif how == "extra":
                entry["bogus"] = 1
            else:
                entry.pop(how[4:], None)
        elif where == "step":
            entry["step"] = ex.draw(
                st.one_of(st.sampled_from(STEP_GARBAGE), garbage()), label="step (garbage)"
            )
        else:
            k = ex.draw(st.sampled_from(["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]), label="array")
            a = model.p[key]
            entry[k] = ex.buffer(f"state_dict['state'][{key}][{k!r}]", a.shape, a.dtype, bad=True)
    elif where == "step_count":
        sd["step_count"] = ex.draw(
            st.one_of(st.sampled_from(STEP_GARBAGE), garbage()), label="step_count (garbage)"
        )
    return "mutated", sd


def _count(value, what, limit=2**62):
    if isinstance(value, (bool, np.bool_)):
        raise MustReject(f"{what} = {value!r} is a bool, not an integer")
    if not isinstance(value, numbers.Integral):
        # a whole float (3.0) may be taken as the integer it equals; anything else not
        try:
            f = float(value) if isinstance(value, numbers.Real) else None
        except Exception:
            f = None
        if f is None or not math.isfinite(f) or f != math.floor(f):
            raise MustReject(f"{what} = {value!r} is not an integer")
        value = int(f)
    try:
        v = int(value)
    except Exception as e:
        raise MustReject(f"{what} = {value!r}: int() raises {type(e).__name__}") from e
    if v < 0 or (limit is not None and v >= limit):
        raise MustReject(f"{what} = {v} is out of range [0, {limit})")
    return v


def predict_load(model, opt, sd):
    """The model after opt.load_state_dict(sd), or MustReject for clear garbage."""
    if not isinstance(sd, dict):
        raise MustReject("the state_dict is not a dict")
    if "state" not in sd or "param_groups" not in sd:
        raise MustReject("the state_dict lacks 'state' or 'param_groups'")
    groups = sd["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(model.groups):
        raise MustReject("wrong param_groups")
    new = model.clone()
    ids = []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict):
            raise MustReject(f"param_groups[{gi}] is not a dict")
        if any(k not in g for k in OPTION_KEYS + ("params",)):
            raise MustReject(f"param_groups[{gi}] lacks keys")
        nparams = sum(1 for x in model.group_of if x == gi)
        ps = g["params"]
        if not isinstance(ps, (list, tuple)) or len(ps) != nparams:
            raise MustReject(f"param_groups[{gi}]['params'] does not list {nparams} ids")
        ids.extend(ps)
        opts = {k: g[k] for k in OPTION_KEYS}
        spec_options(opts, 1)
        new.groups[gi] = opts
    try:
        if len(set(ids)) != len(ids):
            raise MustReject("a parameter id appears twice")
    except TypeError:
        raise MustReject("an unhashable parameter id") from None
    state = sd["state"]
    if not isinstance(state, dict):
        raise MustReject("state is not a dict")
    try:
        unknown = [k for k in state if k not in ids]
    except TypeError:
        raise MustReject("an unhashable state key") from None
    if unknown:
        raise MustReject(f"state has entries for unknown ids {unknown!r}")
    pos = {k: i for i, k in enumerate(ids)}
    for i in range(len(model.p)):
        entry = state.get(ids[i])
        gi = model.group_of[i]
        amsgrad = bool(new.groups[gi]["amsgrad"])
        a = model.p[i]
        new.m[i], new.v[i] = np.zeros_like(a), np.zeros_like(a)
        new.vmax[i] = np.zeros_like(a) if amsgrad else None
        new.steps[i] = 0
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise MustReject(f"state entry {ids[i]!r} is not a dict")
        for k in ("step", "exp_avg", "exp_avg_sq"):
            if k not in entry:
                raise MustReject(f"state entry {ids[i]!r} lacks {k!r}")
        new.steps[i] = _count(entry["step"], f"state[{ids[i]!r}]['step']")
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k not in entry:
                continue
            try:
                v = np.asarray(entry[k])
            except Exception:
                raise MustReject(f"state[{ids[i]!r}][{k!r}] is not an array") from None
            if v.shape != a.shape or v.dtype.kind != "f" or v.dtype.itemsize != a.itemsize:
                raise MustReject(f"state[{ids[i]!r}][{k!r}] is {v.shape} {v.dtype}")
            if k == "max_exp_avg_sq" and not amsgrad:
                continue
            {"exp_avg": new.m, "exp_avg_sq": new.v, "max_exp_avg_sq": new.vmax}[k][i] = v.astype(
                a.dtype
            )
    del pos
    if "step_count" in sd:
        new.step_count = _count(sd["step_count"], "step_count", limit=None)
    else:
        new.step_count = max(new.steps, default=0)
    return new, None


@fuzz(300)
@given(data=st.data())
@collecting
def test_numpy_api_load_state_dict(data):
    ex = Ex(data)
    opt, model = build_np_opt(ex)
    for k in range(ex.draw(st.integers(0, 2), label="valid steps before")):
        valid_np_step(ex, opt, model, f"valid step {k + 1}")
    sd = opt.state_dict()
    ex.mem.add_tree(sd)
    for _ in range(ex.draw(st.integers(1, 2), label="mutations")):
        if not isinstance(sd, dict):
            break
        try:
            _, sd = _mutate_state_dict(ex, sd, model)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            pass  # the previous mutation left nothing this one can change
    ex.mem.add_tree(sd)
    np_call(
        ex,
        opt,
        model,
        "load_state_dict",
        lambda: opt.load_state_dict(sd),
        lambda: predict_load(model, opt, sd),
    )
    # the state_dict's arrays are never written, not even by later steps
    before = ex.mem.snap()
    grads = valid_grads(ex, model)
    ok = np_step(ex, opt, model, grads, 1.0, what="the valid step after load_state_dict")
    if ok:
        after = ex.mem.snap()
        for i, (b, a) in enumerate(zip(before, after)):
            r = ex.mem.roots[i]
            if a != b and not any(
                r is x or overlaps(as_array(r), as_array(x))
                for x in model.param_objs + grads
                if x is not None
            ):
                fail(
                    "a step after load_state_dict wrote into an array of the loaded "
                    "state_dict (the optimizer kept a reference instead of a copy)"
                )


@fuzz(250)
@given(data=st.data())
@collecting
def test_numpy_api_clip_grad_norm(data):
    ex = Ex(data)
    dtype = ex.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    bad = ex.draw(
        st.lists(
            st.sampled_from(["grad", "max_norm", "num_threads", "container", "alias"]),
            max_size=2,
            unique=True,
        ),
        label="garbage args",
    )
    grads = []
    for i in range(ex.draw(st.integers(1, 4), label="grads")):
        shape = ex.draw(st.sampled_from(SHAPES), label=f"grads[{i}] shape")
        if "alias" in bad and grads and ex.draw(st.booleans(), label="alias?"):
            grads.append(ex.pick(grads, "the same grad again (index)"))
            continue
        grads.append(
            ex.buffer(
                f"grads[{i}]",
                shape,
                dtype,
                bad="grad" in bad and ex.draw(st.booleans(), label="garbage?"),
                kinds=None
                if "grad" in bad
                else VALID_KINDS + ["shared", "shared", "nonfinite", "unaligned"],
            )
        )
    max_norm = (
        ex.draw(garbage(), label="max_norm (garbage)")
        if "max_norm" in bad
        else ex.draw(st.sampled_from([1e-3, 0.5, 1.0, 10.0, 1e6]), label="max_norm")
    )
    kw = {}
    if "num_threads" in bad:
        kw["num_threads"] = ex.draw(garbage(), label="num_threads (garbage)")
    elif ex.draw(st.booleans(), label="pass num_threads?"):
        kw["num_threads"] = valid_value(ex.data, "num_threads")
    arg = grads
    if "container" in bad:
        arg = ex.draw(
            st.sampled_from(
                [
                    "tuple",
                    "generator",
                    "array",
                    "none",
                    "string",
                    "dict",
                    "raiser",
                    "empty",
                    "nested",
                ]
            ),
            label="container",
        )
        arg = {
            "tuple": tuple(grads),
            "generator": (g for g in grads),
            "array": grads[0],
            "none": None,
            "string": "grads",
            "dict": dict(enumerate(grads)),
            "raiser": Raiser("grads"),
            "empty": [],
            "nested": [grads],
        }[arg]
    arrays = [as_array(g) for g in grads]
    before_vals = [None if a is None else a.copy() for a in arrays]
    before = ex.mem.snap()
    ok, norm = attempt("clip_grad_norm_", lambda: fastadam.clip_grad_norm_(arg, max_norm, **kw))
    if not ok:
        ex.mem.check(before, "clip_grad_norm_")
        return
    # accepted: every gradient (each distinct memory) scaled by the coefficient once
    if not _pos_real(max_norm):
        fail(f"clip_grad_norm_ accepted max_norm={max_norm!r}")
    if "num_threads" in kw and not (
        kw["num_threads"] is None
        or (
            isinstance(kw["num_threads"], numbers.Integral)
            and not isinstance(kw["num_threads"], (bool, np.bool_))
            and kw["num_threads"] >= 1
        )
    ):
        fail(f"clip_grad_norm_ accepted num_threads={kw['num_threads']!r}")
    if not isinstance(norm, float):
        fail(f"clip_grad_norm_ returned {type(norm).__name__}, not a float")
    used = [
        a
        for a in (
            arrays
            if arg is grads or isinstance(arg, tuple)
            else ([as_array(arg)] if isinstance(arg, np.ndarray) else [])
        )
        if a is not None
    ]
    if arg is grads or isinstance(arg, tuple):
        for i, a in enumerate(arrays):
            if a is None:
                fail(f"clip_grad_norm_ accepted grads[{i}] = {grads[i]!r}")
            # float16 gradients are valid (16-bit training; docs/formats.md)
            if a.dtype not in (np.float32, np.float64, np.float16) or not a.flags.c_contiguous:
                fail(
                    f"clip_grad_norm_ accepted grads[{i}] of dtype {a.dtype}, "
                    f"contiguous={a.flags.c_contiguous}"
                )
        with np.errstate(all="ignore"):
            sumsq = sum(float(np.sum(b.astype(np.float64) ** 2)) for b in before_vals)
        expect = math.sqrt(sumsq)
        if not (
            math.isclose(norm, expect, rel_tol=1e-9, abs_tol=1e-300)
            or (math.isnan(norm) and math.isnan(expect))
            or (math.isinf(norm) and not math.isfinite(expect))
        ):
            fail(f"clip_grad_norm_ returned {norm!r}, NumPy's norm is {expect!r}")
        coef = float(max_norm) / (norm + 1e-6)
        for i, (a, b) in enumerate(zip(arrays, before_vals)):
            if coef < 1.0:
                with np.errstate(all="ignore"):
                    want = b * b.dtype.type(coef)
            else:
                want = b
            same_values(
                a,
                want,
                f"clip_grad_norm_: grads[{i}] after clipping (coefficient {coef!r}, applied once)",
            )
    del used


# ================================================================== functional tests
FUNC_BUFFERS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
FUNC_OPTIONS = OPTION_KEYS + ("num_threads", "grad_scale", "skip_nonfinite")


def _func_call(bufs, kw):
    return lambda: fastadam.adam_step(
        bufs["param"], bufs["grad"], bufs["exp_avg"], bufs["exp_avg_sq"], **kw
    )


@fuzz(500)
@given(data=st.data())
@collecting
def test_functional_adam_step(data):
    ex = Ex(data)
    bad = ex.draw(
        st.lists(
            st.sampled_from(FUNC_BUFFERS + FUNC_BUFFERS + FUNC_OPTIONS + ("step", "alias")),
            max_size=3,
            unique=True,
        ),
        label="garbage args",
    )
    dtype = ex.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    shape = ex.draw(st.sampled_from(SHAPES), label="shape")
    bufs = {}
    for name in FUNC_BUFFERS:
        if (
            name == "max_exp_avg_sq"
            and name not in bad
            and ex.draw(st.booleans(), label="vmax None?")
        ):
            bufs[name] = None
            continue
        if "alias" in bad and ex.made and ex.draw(st.booleans(), label=f"{name} aliases?"):
            bufs[name] = ex.array("alias", shape, dtype, name)
            continue
        bufs[name] = ex.buffer(name, shape, dtype, bad=name in bad)
    kw = {"step": value(ex.data, "step", bad), "max_exp_avg_sq": bufs["max_exp_avg_sq"]}
    for key in FUNC_OPTIONS:
        if key in bad or ex.draw(st.integers(0, 2), label=f"pass {key}?") == 0:
            kw[key] = value(ex.data, key, bad, callables=False)
    call_kw = dict(kw)
    if "betas" in kw and not isinstance(kw["betas"], (tuple, list, np.ndarray)):
        try:
            if iter(kw["betas"]) is kw["betas"]:  # a one-shot iterator: one for each side
                items = list(kw["betas"])
                kw["betas"], call_kw["betas"] = tuple(items), iter(items)
        except Exception:
            pass
    before = ex.mem.snap()
    try:
        pred = _func_predict(bufs, kw)
    except MustReject as e:
        pred = e
    except (TypeError, ValueError, HostileError, ArithmeticError) as e:
        pred = MustReject(f"the specification raises {type(e).__name__}: {e}")
    ok, res = attempt("adam_step", _func_call(bufs, call_kw))
    if not ok:
        ex.mem.check(before, "adam_step")
        return
    if isinstance(pred, MustReject):
        fail(f"adam_step succeeded, but must have been refused: {pred}")
    copies, expected = pred
    if res is not expected and res != expected:
        fail(f"adam_step returned {res!r}, the specification {expected!r}")
    for name, want in copies.items():
        same_values(as_array(bufs[name]), want, f"adam_step: {name}")


def _flag_like(v):
    return isinstance(v, (bool, np.bool_)) or (isinstance(v, numbers.Integral))


def _func_predict(bufs, kw):
    """The specification's result of adam_step(**bufs, **kw), on copies, or MustReject."""
    opts = {k: reference_default(k) for k in OPTION_KEYS}
    opts.update({k: kw[k] for k in OPTION_KEYS if k in kw})
    step = _count(kw["step"], "step", limit=2**62 + 1)
    if step < 1:
        raise MustReject("step < 1")
    gs = kw.get("grad_scale", 1.0)
    if isinstance(gs, (bool, np.bool_)):
        raise MustReject("grad_scale is a bool")
    spec_options(opts, step, gs)
    consts = reference.step_constants(step, grad_scale=gs, **opts)
    nt = kw.get("num_threads")
    if not (
        nt is None
        or (isinstance(nt, numbers.Integral) and not isinstance(nt, (bool, np.bool_)) and nt >= 1)
    ):
        raise MustReject(f"num_threads = {nt!r}")
    if "skip_nonfinite" in kw and not _flag_like(kw["skip_nonfinite"]):
        raise MustReject(f"skip_nonfinite = {kw['skip_nonfinite']!r} is not a bool")
    pa = as_array(bufs["param"])
    if pa is None or pa.dtype not in (np.float32, np.float64):
        raise MustReject("param is not a float32/float64 buffer")
    names = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if consts.amsgrad else [])
    arrays = {}
    for name in names:
        if bufs[name] is None:
            raise MustReject(f"{name} is None")
        arrays[name] = check_writable_buffer(bufs[name], pa.dtype, pa.shape, name)
    if bufs["grad"] is None:
        raise MustReject(
            "grad is None: adam_step takes an array (None skips a parameter only in Adam.step)"
        )
    g = as_array(bufs["grad"])
    if g is None or g.dtype != pa.dtype or g.shape != pa.shape or not g.flags.c_contiguous:
        raise MustReject("grad is not a C-contiguous buffer like param")
    for i, a in enumerate(names):
        for b in names[:i] + ["grad"]:
            if overlaps(arrays[a], g if b == "grad" else arrays[b]):
                raise MustReject(f"{a} shares memory with {b}")
    copies = {k: v.copy() for k, v in arrays.items()}
    rkw = {k: v for k, v in kw.items() if k != "max_exp_avg_sq"}
    rkw["skip_nonfinite"] = bool(kw.get("skip_nonfinite", False))
    with np.errstate(all="ignore"):
        expected = reference.adam_step(
            copies["param"],
            g.copy(),
            copies["exp_avg"],
            copies["exp_avg_sq"],
            max_exp_avg_sq=copies.get("max_exp_avg_sq"),
            **rkw,
        )
    return copies, expected


def reference_default(k):
    return {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "decoupled_weight_decay": False,
        "amsgrad": False,
        "maximize": False,
        "bias_correction": True,
        "eps_mode": "paper",
    }[k]


def _func_outcome(dtype, n, seed, step=1, **kw):
    """(True, bytes of param/m/v/vmax, return value) or (False, exception type)."""
    rng = np.random.default_rng(seed)
    p, g = rng.uniform(-1, 1, n).astype(dtype), rng.uniform(-1, 1, n).astype(dtype)
    m, v, vm = (np.zeros(n, dtype) for _ in range(3))
    ok, r = attempt(
        "adam_step", lambda: fastadam.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vm, **kw)
    )
    if not ok:
        return False, type(r).__name__
    return True, (p.tobytes(), m.tobytes(), v.tobytes(), vm.tobytes(), r)


def _opt_outcome(dtype, n, seed, grad_scale=1.0, **kw):
    rng = np.random.default_rng(seed)
    p, g = rng.uniform(-1, 1, n).astype(dtype), rng.uniform(-1, 1, n).astype(dtype)
    ok, opt = attempt("Adam()", lambda: fastadam.Adam([p], **kw))
    if not ok:
        return False, type(opt).__name__
    ok, r = attempt("Adam.step", lambda: opt.step([g], grad_scale=grad_scale))
    if not ok:
        return False, type(r).__name__
    s = opt.state[0]
    vm = s.get("max_exp_avg_sq", np.zeros(n, dtype))
    return True, (p.tobytes(), s["exp_avg"].tobytes(), s["exp_avg_sq"].tobytes(), vm.tobytes(), r)


@fuzz(300)
@given(data=st.data())
@collecting
def test_functional_agrees_with_optimizer(data):
    """adam_step(x=v) and Adam(x=v).step agree on every value v of every option: both
    accept it with the same result, or both refuse it."""
    key = data.draw(st.sampled_from(OPTION_KEYS + ("grad_scale", "num_threads")), label="option")
    val = data.draw(st.one_of(garbage(), st.sampled_from(VALID[key])), label="value")
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    n = data.draw(st.sampled_from([1, 5, 33]), label="n")
    if callable(val) and key == "lr":
        return  # lr schedules are the optimizer's alone
    if key == "decoupled_weight_decay" and val is None:
        return  # Adam's documented default (the class's own), adam_step has none
    kw, kw2 = {key: _copy(val)}, {key: _copy(val)}
    f = _func_outcome(dtype, n, 7, **kw)
    if key == "grad_scale":
        o = _opt_outcome(dtype, n, 7, grad_scale=kw2["grad_scale"])
    else:
        o = _opt_outcome(dtype, n, 7, **kw2)
    if f[0] != o[0] or (f[0] and f[1] != o[1]):
        fail(f"{key}={val!r}: adam_step gives {_show(f)}, Adam(...).step gives {_show(o)}")


def _copy(x):
    """A fresh copy where copying is possible (one-shot iterators are shared)."""
    try:
        return copy.copy(x)
    except Exception:
        return x


def _show(outcome):
    return "success" if outcome[0] else f"{outcome[1]}"


NP_EQUIVALENTS = [
    ("amsgrad", True, lambda: np.True_),
    ("amsgrad", False, lambda: np.False_),
    ("maximize", True, lambda: np.True_),
    ("maximize", False, lambda: np.False_),
    ("decoupled_weight_decay", True, lambda: np.True_),
    ("bias_correction", False, lambda: np.False_),
    ("bias_correction", True, lambda: np.True_),
    ("skip_nonfinite", True, lambda: np.True_),
    ("skip_nonfinite", False, lambda: np.False_),
    ("lr", 0.5, lambda: np.float64(0.5)),
    ("lr", 0.25, lambda: np.float32(0.25)),
    ("lr", 1, lambda: np.int64(1)),
    ("eps", 0.125, lambda: np.float32(0.125)),
    ("weight_decay", 0.5, lambda: np.float64(0.5)),
    ("weight_decay", 0, lambda: np.int8(0)),
    ("eps_mode", "hat", lambda: np.str_("hat")),
    ("step", 3, lambda: np.int64(3)),
    ("step", 3, lambda: np.uint8(3)),
    ("num_threads", 2, lambda: np.int32(2)),
    ("grad_scale", 2.0, lambda: np.float64(2.0)),
    ("grad_scale", 2, lambda: np.int64(2)),
    ("grad_scale", 0.5, lambda: np.float32(0.5)),
    ("betas", (0.5, 0.25), lambda: (np.float64(0.5), np.float32(0.25))),
]


@pytest.mark.parametrize(
    "key, py, npv", NP_EQUIVALENTS, ids=[f"{k}={p!r}" for k, p, _ in NP_EQUIVALENTS]
)
def test_functional_numpy_scalars_like_python(key, py, npv):
    """A NumPy scalar is treated like the Python number it equals (np.True_ like True,
    np.float64(0.5) like 0.5, ...), by adam_step and by Adam."""
    for dtype in (np.float32, np.float64):
        a = _func_outcome(dtype, 9, 3, **{key: py})
        b = _func_outcome(dtype, 9, 3, **{key: npv()})
        if a != b:
            fail(f"adam_step({key}={py!r}) gives {_show(a)}, ({key}={npv()!r}) gives {_show(b)}")
        if key == "step":
            continue
        kw_py = {"grad_scale": py} if key == "grad_scale" else {key: py}
        kw_np = {"grad_scale": npv()} if key == "grad_scale" else {key: npv()}
        a = _opt_outcome(dtype, 9, 3, **kw_py)
        b = _opt_outcome(dtype, 9, 3, **kw_np)
        if a != b:
            fail(f"Adam({key}={py!r}) gives {_show(a)}, ({key}={npv()!r}) gives {_show(b)}")


# ======================================================================= torch tests
def _need_torch():
    return pytest.importorskip("torch", reason="torch is not installed")


T_DTYPES = ["float32", "float64", "complex64"]
T_SHAPES = [(), (1,), (3,), (7,), (2, 3), (17,), (0,), (64,)]
T_OPTION_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "decoupled_weight_decay",
)
T_VALID = {
    "lr": [1e-3, 0.1, 0.0, "tensor"],
    "betas": [(0.9, 0.999), (0.5, 0.9), (0.0, 0.0)],
    "eps": [1e-8, 1e-3],
    "weight_decay": [0, 0.1],
    "amsgrad": [False, True],
    "maximize": [False, True],
    "decoupled_weight_decay": [False, True],
}


def t_valid(data, key, label):
    v = data.draw(st.sampled_from(T_VALID[key]), label=f"{label} (valid)")
    return torch.tensor(0.01) if v == "tensor" else v


class TorchCase:
    """A fastadam.torch optimizer and its twin, built identically; the twin only ever
    sees valid calls."""

    def __init__(self, ex):
        self.ex = ex
        d = ex
        self.cls = d.draw(
            st.sampled_from([fastadam_torch().Adam, fastadam_torch().AdamW]), label="class"
        )
        ng = d.draw(st.integers(1, 2), label="groups")
        self.spec = []
        for gi in range(ng):
            k = d.draw(st.integers(1, 3), label=f"group {gi}: parameters")
            shapes = [
                (
                    d.draw(st.sampled_from(T_SHAPES), label=f"g{gi} p{j} shape"),
                    d.draw(st.sampled_from(T_DTYPES), label=f"g{gi} p{j} dtype"),
                )
                for j in range(k)
            ]
            opts = {
                key: t_valid(d, key, f"group {gi} {key}")
                for key in d.draw(
                    st.lists(st.sampled_from(T_OPTION_KEYS), max_size=3, unique=True),
                    label=f"group {gi} options",
                )
            }
            self.spec.append((shapes, opts))
        self.kwargs = {}
        if d.draw(st.integers(0, 3), label="clip?") == 0:
            self.kwargs["max_grad_norm"] = d.draw(
                st.sampled_from([1.0, 0.05]), label="max_grad_norm"
            )
        if d.draw(st.booleans(), label="num_threads?"):
            self.kwargs["num_threads"] = d.draw(st.sampled_from([1, 2]), label="num_threads")
        self.seed = d.draw(st.integers(0, 2**16), label="torch seed")
        self.opt, self.params = self.make()
        self.twin, self.tparams = self.make()
        for p in self.params:
            ex.mem.add(p)

    def make(self):
        g = torch.Generator().manual_seed(self.seed)
        groups, params = [], []
        for shapes, opts in self.spec:
            ps = [
                torch.nn.Parameter(torch.randn(s, generator=g, dtype=getattr(torch, dt)))
                for s, dt in shapes
            ]
            params += ps
            groups.append(
                {
                    "params": ps,
                    **{
                        k: (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in opts.items()
                    },
                }
            )
        ok, opt = attempt(
            "building a valid fastadam.torch optimizer", lambda: self.cls(groups, **self.kwargs)
        )
        if not ok:
            fail(f"a valid fastadam.torch configuration was refused: {opt}")
        return opt, params

    def valid_grads(self, label, finite=True):
        """Draw valid grads; returns the list of (tensor or None) per parameter."""
        out = []
        for i, p in enumerate(self.params):
            if self.ex.draw(st.integers(0, 4), label=f"{label}: grads[{i}] None?") == 0:
                out.append(None)
                continue
            t = torch.from_numpy(self.ex.rng.standard_normal(tuple(p.shape)))
            if p.is_complex():
                t = torch.complex(t, torch.from_numpy(self.ex.rng.standard_normal(tuple(p.shape))))
            out.append(t.to(p.dtype))
        return out

    def set_grads(self, grads, which="both"):
        for lst, g_on in ((self.params, "opt"), (self.tparams, "twin")):
            if which not in ("both", g_on):
                continue
            for p, g in zip(lst, grads):
                p.grad = None if g is None else g.clone()

    def compare(self, what):
        for i, (p, q) in enumerate(zip(self.params, self.tparams)):
            if t_bytes(p) != t_bytes(q):
                fail(
                    f"after {what}: parameter {i} differs from the twin that never saw the "
                    f"hostile call"
                )
            s, u = self.opt.state.get(p, {}), self.twin.state.get(q, {})
            if _fresh(s) and _fresh(u):
                continue  # zero state made for a parameter whose step was refused == none
            if bool(s) != bool(u):
                fail(
                    f"after {what}: parameter {i} has state {sorted(s)} but the twin has "
                    f"{sorted(u)}"
                )
            for k in set(s) | set(u):
                a, b = s.get(k), u.get(k)
                if k == "step":
                    fa = float(a.item() if isinstance(a, torch.Tensor) else a)
                    fb = float(b.item() if isinstance(b, torch.Tensor) else b)
                    if fa != fb:
                        fail(f"after {what}: state[{i}]['step'] is {fa}, the twin's {fb}")
                elif k == "max_exp_avg_sq" and (a is None or b is None):
                    continue
                elif t_bytes(a) != t_bytes(b):
                    fail(f"after {what}: state[{i}][{k!r}] differs from the twin's")

    def valid_step(self, what, must_succeed=True):
        grads = self.valid_grads(what)
        self.set_grads(grads)
        ok, r = attempt(f"{what} (opt)", lambda: self.opt.step(), allowed=ALLOWED)
        ok2, r2 = attempt(f"{what} (twin)", lambda: self.twin.step())
        if not ok2:
            fail(f"{what}: the twin refused a valid step: {r2}")
        if not ok:
            fail(f"{what}: a valid step raised {type(r).__name__}: {r}")
        self.compare(what)

    def snapshot_opt(self):
        self.ex.mem.add_tree(
            [
                v
                for s in self.opt.state.values()
                for v in (s.values() if isinstance(s, dict) else [])
            ]
        )
        for p in self.params:
            if p.grad is not None:
                self.ex.mem.add(p.grad)
        return self.ex.mem.snap()


def _fresh(s):
    """No state, or the zero state a first step makes before it runs."""
    if not s:
        return True
    if not isinstance(s, dict):
        return False
    for _k, v in s.items():
        if not isinstance(v, torch.Tensor):
            return False
        if v.layout != torch.strided or v.device.type != "cpu":
            return False
        if v.numel() and bool((v != 0).any()):
            return False
    return True


def fastadam_torch():
    import fastadam.torch as ft

    return ft


T_GRAD_KINDS = [
    "valid",
    "none",
    "noncontig",
    "expanded",
    "requires_grad",
    "neg_view",
    "conj_view",
    "sparse",
    "alias_param",
    "alias_other",
    "alias_state",
    "wrong_dtype",
    "wrong_shape",
    "zero_dim",
    "bf16",
    "int",
    "bool",
    "nonfinite",
    "subclass",
    "channels_last",
]
T_ACCEPTABLE = {
    "valid",
    "none",
    "noncontig",
    "expanded",
    "requires_grad",
    "neg_view",
    "conj_view",
    "nonfinite",
    "subclass",
    "channels_last",
    "alias_param",
    "alias_other",
}  # alias_other: refused only if that parameter steps too


class TSub(torch.Tensor if torch is not None else object):
    pass


def _t_garbage_grad(case, i, kind):
    """(tensor to assign or swap in, how: 'assign' | 'swap', the twin's equivalent)."""
    p = case.params[i]
    good = case.valid_grads(f"grads[{i}] base")[i]
    if good is None:
        good = torch.zeros_like(p)
    if kind == "valid":
        return good, "assign", good
    if kind == "none":
        return None, "assign", None
    if kind == "noncontig":
        if p.dim() == 0 or p.numel() < 2:
            return good, "assign", good
        big = torch.zeros(tuple(p.shape[:-1]) + (p.shape[-1] * 2,), dtype=p.dtype)
        v = big[..., ::2]
        v.copy_(good)
        return v, "assign", good
    if kind == "expanded":
        if p.dim() == 0:
            return good, "assign", good
        one = good.reshape(-1)[:1] if good.numel() else torch.zeros(1, dtype=p.dtype)
        v = one.reshape((1,) * p.dim()).expand(p.shape)
        return v, "assign", v.clone()
    if kind == "requires_grad":
        return good.clone().requires_grad_(True), "assign", good
    if kind == "neg_view":
        base = (-good).clone()
        return base._neg_view(), "assign", good
    if kind == "conj_view":
        if not p.is_complex():
            return good, "assign", good
        return good.conj().clone().conj(), "assign", good  # a conj view of conj(good)
    if kind == "sparse":
        return good.to_sparse(), "assign", None
    if kind == "alias_param":
        return p.detach(), "assign", p.detach().clone()
    if kind == "alias_other":
        others = [
            q for q in case.params if q is not p and q.shape == p.shape and q.dtype == p.dtype
        ]
        other = others[0].detach() if others else p.detach()
        return other, "assign", (other.clone() if others else None)
    if kind == "alias_state":
        s = case.opt.state.get(p)
        if s and isinstance(s.get("exp_avg"), torch.Tensor):
            return s["exp_avg"], "assign", None
        return p.detach(), "assign", p.detach().clone()  # no state yet: alias the param
    if kind == "wrong_dtype":
        dt = torch.float64 if p.dtype != torch.float64 else torch.float32
        return good.real.to(dt) if good.is_complex() else good.to(dt), "swap", None
    if kind == "wrong_shape":
        return torch.zeros(p.numel() + 1, dtype=p.dtype), "swap", None
    if kind == "zero_dim":
        if p.dim() == 0:
            return good, "assign", good
        return torch.zeros((), dtype=p.dtype), "swap", None
    if kind == "bf16":
        return torch.zeros(p.shape, dtype=torch.bfloat16), "swap", None
    if kind == "int":
        return torch.zeros(p.shape, dtype=torch.int64), "swap", None
    if kind == "bool":
        return torch.zeros(p.shape, dtype=torch.bool), "swap", None
    if kind == "nonfinite":
        v = good.clone()
        if v.numel():
            v.reshape(-1)[0] = float("nan")
            v.reshape(-1)[-1] = float("inf")
        return v, "assign", v.clone()
    if kind == "subclass":
        return good.clone().as_subclass(TSub), "assign", good
    if kind == "channels_last":
        if p.dim() != 4:
            return good, "assign", good
        return good.contiguous(memory_format=torch.channels_last), "assign", good
    raise AssertionError(kind)


def _t_scalar(x, what, positive=False, allow_none=True):
    """A real number from a number or a 1-element real tensor, or MustReject."""
    if x is None and allow_none:
        return None
    if isinstance(x, (bool, np.bool_)):
        raise MustReject(f"{what} is a bool")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex() or x.dtype == torch.bool or x.device.type != "cpu":
            raise MustReject(f"{what} is a tensor that is not one real number")
        v = float(x.item())
    elif isinstance(x, numbers.Real):
        try:
            v = float(x)
        except Exception as e:
            raise MustReject(f"{what}: float() raises {e}") from None
    else:
        raise MustReject(f"{what} = {x!r} is not a number")
    if positive and not (math.isfinite(v) and v > 0):
        raise MustReject(f"{what} = {v} is not a finite number > 0")
    return v


@fuzz(150)
@given(data=st.data())
@collecting
def test_torch_construct(data):
    _need_torch()
    ft = fastadam_torch()
    ex = Ex(data)
    cls = ex.draw(st.sampled_from([ft.Adam, ft.AdamW]), label="class")
    bad = ex.draw(
        st.lists(
            st.sampled_from(
                T_OPTION_KEYS
                + (
                    "param",
                    "param",
                    "group",
                    "container",
                    "max_grad_norm",
                    "num_threads",
                    "foreach",
                    "fused",
                    "capturable",
                    "differentiable",
                )
            ),
            max_size=2,
            unique=True,
        ),
        label="garbage args",
    )
    params = []
    for j in range(ex.draw(st.integers(1, 3), label="parameters")):
        shape = ex.draw(st.sampled_from(T_SHAPES), label=f"p{j} shape")
        if "param" in bad and ex.draw(st.booleans(), label=f"p{j} garbage?"):
            kind = ex.draw(
                st.sampled_from(
                    [
                        "int",
                        "bool",
                        "float16",
                        "bfloat16",
                        "noncontig",
                        "sparse",
                        "meta",
                        "no_grad",
                        "same_again",
                        "numpy",
                        "list",
                        "none",
                        "0d",
                        "empty",
                        "view_of",
                        "complex128",
                        "subclass",
                        "neg_view",
                        "conj_view",
                        "expanded",
                    ]
                ),
                label=f"p{j} kind",
            )
            p = _t_garbage_param(ex, kind, shape, params)
        else:
            p = torch.nn.Parameter(
                torch.randn(
                    shape,
                    dtype=getattr(torch, ex.draw(st.sampled_from(T_DTYPES), label=f"p{j} dtype")),
                )
            )
        params.append(p)
    arg = params
    if "group" in bad:
        how = ex.draw(
            st.sampled_from(
                [
                    "no params",
                    "unknown key",
                    "garbage option",
                    "not a dict",
                    "params garbage",
                    "two groups same",
                ]
            ),
            label="group garbage",
        )
        g = {"params": params}
        if how == "no params":
            g = {"lr": 0.1}
        elif how == "unknown key":
            g["bogus"] = 1
        elif how == "garbage option":
            g[ex.draw(st.sampled_from(T_OPTION_KEYS))] = ex.draw(garbage(True), label="value")
        elif how == "not a dict":
            g = ex.draw(garbage(True), label="group")
        elif how == "params garbage":
            g["params"] = ex.draw(garbage(True), label="params")
        arg = [g] if how != "two groups same" else [{"params": params}, {"params": params}]
    if "container" in bad:
        arg = ex.draw(
            st.sampled_from(
                ["none", "tensor", "dict", "string", "empty", "gen", "int", "raiser", "set"]
            ),
            label="container",
        )
        arg = {
            "none": None,
            "tensor": params[0],
            "dict": {"params": params},
            "string": "params",
            "empty": [],
            "gen": (p for p in params),
            "int": 3,
            "raiser": Raiser("params"),
            "set": set(params),
        }[arg]
    kwargs = {}
    for key in T_OPTION_KEYS + (
        "max_grad_norm",
        "num_threads",
        "foreach",
        "fused",
        "capturable",
        "differentiable",
    ):
        if key in bad:
            kwargs[key] = ex.draw(garbage(True), label=f"{key} (garbage)")
        elif key in T_VALID and ex.draw(st.integers(0, 3), label=f"pass {key}?") == 0:
            kwargs[key] = t_valid(ex.data, key, key)
    if cls is ft.AdamW:
        kwargs.pop("decoupled_weight_decay", None)
    for p in params:
        if isinstance(p, torch.Tensor) and p.layout == torch.strided and p.device.type == "cpu":
            ex.mem.add(p)
    allowed = ALLOWED
    if any(
        kwargs.get(k) is not None and _truthy(kwargs.get(k))
        for k in ("capturable", "differentiable")
    ):
        allowed = ALLOWED + (NotImplementedError,)  # documented
    before = ex.mem.snap()
    ok, opt = attempt(
        f"fastadam.torch.{cls.__name__}(params, **{kwargs!r})",
        lambda: cls(arg, **kwargs),
        allowed=allowed,
    )
    if not ok:
        ex.mem.check(before, "construction")
        return
    if ex.mem.snap() != before:
        fail("a successful construction modified a parameter")
    # accepted: a valid step must work (or be refused cleanly)
    ps = [p for g in opt.param_groups for p in g["params"]]
    for p in ps:
        if (
            isinstance(p, torch.Tensor)
            and p.layout == torch.strided
            and p.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)
            and p.device.type == "cpu"
            and p.requires_grad is not False
        ):
            p.grad = torch.zeros_like(p).normal_()
    snap = ex.mem.snap()
    for p in ps:
        if isinstance(p, torch.Tensor) and p.grad is not None:
            ex.mem.add(p.grad)
    snap = ex.mem.snap()
    ok, _r = attempt("the first step after construction", lambda: opt.step())
    if not ok:
        ex.mem.check(snap, "the first step after construction")


def _truthy(x):
    try:
        return bool(x)
    except Exception:
        return True


def _t_garbage_param(ex, kind, shape, params):
    base = torch.randn(shape)
    if kind == "int":
        return torch.zeros(shape, dtype=torch.int64)
    if kind == "bool":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "float16":
        return torch.nn.Parameter(base.half())
    if kind == "bfloat16":
        return torch.nn.Parameter(base.bfloat16())
    if kind == "complex128":
        return torch.nn.Parameter(base.to(torch.complex128))
    if kind == "noncontig":
        return (
            torch.nn.Parameter(torch.randn(tuple(shape) + (2,)))[..., 0]
            if shape
            else base.requires_grad_()
        )
    if kind == "sparse":
        return torch.nn.Parameter(base.to_sparse()) if shape else base
    if kind == "meta":
        return torch.nn.Parameter(torch.empty(shape, device="meta"))
    if kind == "no_grad":
        return base
    if kind == "same_again":
        return params[-1] if params else base
    if kind == "numpy":
        return np.zeros(shape, np.float32)
    if kind == "list":
        return [1.0, 2.0]
    if kind == "none":
        return None
    if kind == "0d":
        return torch.nn.Parameter(torch.tensor(1.0))
    if kind == "empty":
        return torch.nn.Parameter(torch.empty(0))
    if kind == "view_of":
        if params and isinstance(params[-1], torch.Tensor) and params[-1].numel():
            return params[-1].detach().view(-1)[:1]
        return base
    if kind == "subclass":
        return base.as_subclass(TSub)
    if kind == "neg_view":
        return base._neg_view()
    if kind == "conj_view":
        return base.to(torch.complex64).conj()
    if kind == "expanded":
        return torch.randn(1).expand(3)
    raise AssertionError(kind)


def T_STEP_GARBAGE():
    return [
        lambda: torch.tensor(3.0),
        lambda: torch.tensor(3.0, dtype=torch.float64),
        lambda: torch.tensor(3),
        lambda: torch.tensor([3.0]),
        lambda: torch.tensor([3.0, 4.0]),
        lambda: torch.tensor(True),
        lambda: torch.tensor(NAN),
        lambda: torch.tensor(-1.0),
        lambda: torch.tensor(1.5),
        lambda: torch.tensor(2.0**24 + 2),
        lambda: torch.tensor(2.0**70),
        lambda: torch.tensor(INF),
        lambda: torch.tensor(3.0, requires_grad=True),
        lambda: torch.tensor(3.0, device="meta"),
        lambda: torch.tensor(3 + 0j),
        lambda: 3,
        lambda: 3.0,
        lambda: 2**64,
        lambda: 2**63,
        lambda: -1,
        lambda: NAN,
        lambda: "3",
        lambda: None,
        lambda: np.float64(3.0),
        lambda: np.array(3.0),
        lambda: torch.tensor(3.0, dtype=torch.float16),
    ]


@fuzz(200)
@given(data=st.data())
@collecting
def test_torch_step(data):
    _need_torch()
    ex = Ex(data)
    case = TorchCase(ex)
    for k in range(ex.draw(st.integers(0, 2), label="valid steps before")):
        case.valid_step(f"valid step {k + 1}")
    has_state = any(case.opt.state.get(p) for p in case.params)
    action = ex.draw(
        st.sampled_from(
            [
                "grads",
                "grads",
                "grads",
                "grad_scale",
                "found_inf",
                "scaler_attrs",
                "group_option",
                "attribute",
            ]
            + (["state", "state"] if has_state else [])
        ),
        label="hostile action",
    )
    grads = case.valid_grads("hostile step")
    case.set_grads(grads)
    twin_grads = list(grads)
    step_kw, twin_kw = {}, {}
    must_reject = None
    restore = lambda: None  # noqa: E731
    twin_apply = lambda: None  # noqa: E731
    restore_twin = lambda: None  # noqa: E731
    skip_twin = False
    if action == "grads":
        for i in ex.draw(
            st.lists(st.integers(0, len(grads) - 1), min_size=1, unique=True, max_size=len(grads)),
            label="garbage positions",
        ):
            kind = ex.draw(st.sampled_from(T_GRAD_KINDS), label=f"grads[{i}] kind")
            if kind == "nonfinite" and "max_grad_norm" in case.kwargs:
                kind = "valid"
            g, how, eq = _t_garbage_grad(case, i, kind)
            p = case.params[i]
            if how == "assign":
                ok, e = attempt(
                    "assigning .grad",
                    lambda p=p, g=g: setattr(p, "grad", g),
                    allowed=(RuntimeError, TypeError, ValueError),
                )
                if not ok:
                    continue  # torch itself refuses: nothing to test
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                ok, e = attempt(
                    "swapping .grad.data",
                    lambda p=p, g=g: setattr(p.grad, "data", g),
                    allowed=(RuntimeError, TypeError, ValueError),
                )
                if not ok:
                    continue
            if g is not None and isinstance(g, torch.Tensor) and g.layout == torch.strided:
                ex.mem.add(g)
            if (
                kind not in T_ACCEPTABLE
                and not (kind == "zero_dim" and p.dim() == 0)
                and not (kind == "alias_state" and eq is not None)
            ):
                must_reject = f"grads[{i}] is {kind}"
            twin_grads[i] = eq
    elif action in ("grad_scale", "found_inf"):
        val = ex.draw(garbage(True), label=f"{action} (garbage)")
        step_kw[action] = val
        try:
            v = (
                _t_scalar(
                    1.0
                    if val is True or val is np.True_
                    else 0.0
                    if val is False or val is np.False_
                    else val,
                    action,
                    positive=(action == "grad_scale"),
                )
                if action == "found_inf"
                else _t_scalar(val, action, positive=True)
            )
            if v is not None:
                twin_kw[action] = v
        except MustReject as e:
            must_reject = str(e)
    elif action == "scaler_attrs":
        name = ex.draw(st.sampled_from(["grad_scale", "found_inf"]), label="attribute")
        val = ex.draw(garbage(True), label=f"opt.{name} (garbage)")
        setattr(case.opt, name, val)
        restore = lambda name=name: delattr(case.opt, name)  # noqa: E731
        try:
            v = _t_scalar(val, name, positive=(name == "grad_scale"))
            if v is not None:
                twin_kw[name] = v
        except MustReject as e:
            must_reject = str(e)
    elif action == "group_option":
        gi = ex.draw(st.integers(0, len(case.opt.param_groups) - 1), label="group")
        key = ex.draw(st.sampled_from(T_OPTION_KEYS), label="option")
        val = ex.draw(garbage(True), label="value (garbage)")
        g = case.opt.param_groups[gi]
        old = g[key]
        g[key] = val
        restore = lambda g=g, key=key, old=old: g.__setitem__(key, old)  # noqa: E731
        try:
            opts = {k: g[k] for k in T_OPTION_KEYS}
            for k in ("lr", "eps", "weight_decay"):
                opts[k] = _t_scalar(opts[k], k, allow_none=False)
            b = opts["betas"]
            if not isinstance(b, (tuple, list)) or len(b) != 2:
                raise MustReject("betas is not a pair")
            opts["betas"] = tuple(_t_scalar(x, "beta", allow_none=False) for x in b)
            for k in ("amsgrad", "maximize", "decoupled_weight_decay"):
                if not isinstance(opts[k], (bool, np.bool_, int)):
                    raise MustReject(f"{k} = {opts[k]!r} is not a bool")
            spec_options({**opts, "bias_correction": True, "eps_mode": "paper"}, 1)
            tg = case.twin.param_groups[gi]
            val_copy = val.clone() if isinstance(val, torch.Tensor) else _copy(val)

            def twin_apply(tg=tg, key=key, val_copy=val_copy):
                tg[key] = val_copy

            def restore_twin(tg=tg, key=key, old=tg[key]):
                tg[key] = old
        except MustReject as e:
            must_reject = str(e)
        except Exception as e:
            must_reject = f"{type(e).__name__}: {e}"
    elif action == "attribute":
        name = ex.draw(st.sampled_from(["num_threads", "max_grad_norm"]), label="attribute")
        val = ex.draw(garbage(True), label=f"opt.{name} (garbage)")
        old = getattr(case.opt, name)
        ok, _ = attempt(f"opt.{name} = {val!r}", lambda: setattr(case.opt, name, val))
        if not ok:
            return case.valid_step("the valid step after a refused attribute")
        restore = lambda name=name, old=old: setattr(case.opt, name, old)  # noqa: E731
        if name == "num_threads":
            good = val is None or (
                isinstance(val, numbers.Integral)
                and not isinstance(val, (bool, np.bool_))
                and val >= 1
            )
        else:
            good = val is None or _pos_real(val)
        if not good:
            must_reject = f"opt.{name} = {val!r}"
        else:

            def twin_apply(name=name, val=val):
                setattr(case.twin, name, val)

            def restore_twin(name=name, old=getattr(case.twin, name)):  # noqa: B008 (bound now)
                setattr(case.twin, name, old)
    elif action == "state":
        i = ex.draw(
            st.sampled_from([j for j, p in enumerate(case.params) if case.opt.state.get(p)]),
            label="parameter",
        )
        p, q = case.params[i], case.tparams[i]
        s = case.opt.state[p]
        how = ex.draw(
            st.sampled_from(
                ["step", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "del", "replace"]
            ),
            label="state garbage",
        )
        saved = dict(s)

        def restore(p=p, saved=saved):
            case.opt.state[p] = saved

        if how == "step":
            val = ex.draw(
                st.sampled_from(T_STEP_GARBAGE()).map(lambda f: f()), label="step (garbage)"
            )
            s["step"] = val
            try:
                v = _t_scalar(val, "step", allow_none=False)
                if not (math.isfinite(v) and v >= 0 and v == math.floor(v)):
                    raise MustReject(f"step {v} is not a whole number >= 0")
                if isinstance(val, torch.Tensor) and val.requires_grad:
                    pass

                # (copied now: the hostile step updates the tensor it accepted in place)
                copied = val.detach().clone() if isinstance(val, torch.Tensor) else val

                def twin_apply(
                    q=q,
                    val=copied,
                ):
                    case.twin.state[q]["step"] = val
            except MustReject as e:
                must_reject = str(e)
        elif how == "del":
            k = ex.draw(st.sampled_from(sorted(s)), label="key to delete")
            del s[k]
            if k != "max_exp_avg_sq":
                must_reject = f"state[{i}] lacks {k!r}"
            else:

                def twin_apply(q=q):
                    del case.twin.state[q]["max_exp_avg_sq"]
        elif how == "replace":
            val = ex.draw(st.sampled_from([None, {}, 5, "x", [], {"step": 1}]), label="state entry")
            case.opt.state[p] = val
            if val is None or val == {}:

                def twin_apply(q=q, val=val):
                    case.twin.state[q] = copy.copy(val)
            else:
                must_reject = f"state[{i}] = {val!r}"
        else:
            val = _t_state_garbage(ex, p, s, case)
            s[how] = val
            if (
                isinstance(val, torch.Tensor)
                and val.layout == torch.strided
                and val.device.type == "cpu"
            ):
                ex.mem.add(val)
            if val is None and how == "max_exp_avg_sq":

                def twin_apply(q=q):
                    case.twin.state[q].pop("max_exp_avg_sq", None)
            elif not (
                isinstance(val, torch.Tensor)
                and val.shape == p.shape
                and val.dtype == p.dtype
                and val.device == p.device
                and val.layout == torch.strided
                and not any(_t_overlap(val, x) for x in _t_live(case))
            ):
                must_reject = f"state[{i}][{how!r}] = {_t_desc(val)}"
            else:

                def twin_apply(q=q, how=how, val=val.detach().clone()):  # noqa: B008 (copied now)
                    case.twin.state[q][how] = val

    # the hostile step
    restore = _once(restore)
    before = case.snapshot_opt()
    allowed = ALLOWED
    ok, _r = attempt(f"hostile step ({action})", lambda: case.opt.step(**step_kw), allowed=allowed)
    if ok:
        if must_reject:
            fail(f"hostile step ({action}) succeeded, but must have been refused: {must_reject}")
        twin_apply()
        for q, g in zip(case.tparams, twin_grads):
            q.grad = None if g is None else g.clone()
        ok2, r2 = attempt("the twin's step", lambda: case.twin.step(**twin_kw))
        if not ok2:
            fail(f"the twin refused the sanitized equivalent of the accepted hostile step: {r2}")
        if not skip_twin:
            case.compare(f"hostile step ({action}), accepted")
        if action != "state":  # an accepted state change stays (in both)
            restore()
            restore_twin()
    else:
        ex.mem.check(before, f"hostile step ({action})")
        restore()
        case.compare(f"hostile step ({action}), refused")
    case.valid_step("the valid step after the hostile one")


def _once(fn):
    done = []

    def run():
        if not done:
            done.append(True)
            fn()

    return run


def _t_live(case):
    out = [p.detach() for p in case.params]
    for s in case.opt.state.values():
        if isinstance(s, dict):
            out += [v for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor)]
    return out


def _t_overlap(a, b):
    if a is b or a.layout != torch.strided or b.layout != torch.strided:
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or not a.numel() or not b.numel():
        return False
    sa = a.untyped_storage().data_ptr()
    sb = b.untyped_storage().data_ptr()
    return sa == sb


def _t_desc(x):
    if isinstance(x, torch.Tensor):
        return f"a {tuple(x.shape)} {x.dtype} {x.layout} tensor on {x.device}"
    return repr(x)


def _t_state_garbage(ex, p, s, case):
    kind = ex.draw(
        st.sampled_from(
            [
                "wrong_shape",
                "wrong_dtype",
                "meta",
                "noncontig",
                "numpy",
                "list",
                "none",
                "string",
                "int",
                "alias_param",
                "alias_other_state",
                "sparse",
                "expanded",
                "requires_grad",
                "valid_copy",
                "float_scalar",
            ]
        ),
        label="state tensor garbage",
    )
    if kind == "wrong_shape":
        return torch.zeros(p.numel() + 1, dtype=p.dtype)
    if kind == "wrong_dtype":
        return torch.zeros(
            p.shape, dtype=torch.float64 if p.dtype != torch.float64 else torch.float32
        )
    if kind == "meta":
        return torch.zeros(p.shape, dtype=p.dtype, device="meta")
    if kind == "noncontig":
        if p.dim() == 0 or p.numel() < 2:
            return torch.zeros_like(p).detach()
        return torch.zeros(tuple(p.shape) + (2,), dtype=p.dtype)[..., 0]
    if kind == "numpy":
        return np.zeros(tuple(p.shape), np.float32)
    if kind == "list":
        return [0.0] * max(p.numel(), 1)
    if kind == "none":
        return None
    if kind == "string":
        return "exp_avg"
    if kind == "int":
        return torch.zeros(p.shape, dtype=torch.int64)
    if kind == "alias_param":
        return p.detach()
    if kind == "alias_other_state":
        others = [v for k, v in s.items() if k not in ("step",) and isinstance(v, torch.Tensor)]
        return others[0] if others else p.detach()
    if kind == "sparse":
        return torch.zeros_like(p).detach().to_sparse() if p.dim() else torch.zeros_like(p)
    if kind == "expanded":
        if p.dim() == 0:
            return torch.zeros((), dtype=p.dtype)
        return torch.zeros((1,) * p.dim(), dtype=p.dtype).expand(p.shape)
    if kind == "requires_grad":
        return torch.zeros_like(p).detach().requires_grad_(True)
    if kind == "valid_copy":
        return torch.zeros_like(p).detach()
    if kind == "float_scalar":
        return 0.0
    raise AssertionError(kind)


@fuzz(150)
@given(data=st.data())
@collecting
def test_torch_load_state_dict(data):
    _need_torch()
    ex = Ex(data)
    case = TorchCase(ex)
    for k in range(ex.draw(st.integers(0, 2), label="valid steps before")):
        case.valid_step(f"valid step {k + 1}")
    orig = copy.deepcopy(case.opt.state_dict())
    sd = copy.deepcopy(orig)
    for _ in range(ex.draw(st.integers(1, 2), label="mutations")):
        if not isinstance(sd, dict):
            break
        try:
            sd = _t_mutate_sd(ex, sd, case)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            pass  # the previous mutation left nothing this one can change
    ex.mem.add_tree(sd)
    before = case.snapshot_opt()
    ok, r = attempt("load_state_dict", lambda: case.opt.load_state_dict(sd))
    if not ok:
        ex.mem.check(before, "load_state_dict")
        case.compare("a refused load_state_dict")
    else:
        # accepted: a valid step must work or be refused cleanly
        grads = case.valid_grads("step after load")
        for p, g in zip(case.params, grads):
            p.grad = None if g is None else g.clone()
        snap = case.snapshot_opt()
        ok, r = attempt("the step after an accepted load_state_dict", lambda: case.opt.step())
        if not ok:
            ex.mem.check(snap, "the step after an accepted load_state_dict")
        # recovery: loading the original state makes it the twin again
        ok, r = attempt(
            "load_state_dict(the original state)",
            lambda: case.opt.load_state_dict(copy.deepcopy(orig)),
        )
        if not ok:
            fail(f"loading a state_dict the optimizer itself wrote was refused: {r}")
        with torch.no_grad():  # the step after the load moved the parameters: sync them
            for p, q in zip(case.params, case.tparams):
                q.copy_(p)
        case.compare("reloading the original state")
    case.valid_step("the valid step after load_state_dict")


def _t_mutate_sd(ex, sd, case):
    where = ex.draw(
        st.sampled_from(
            ["top", "groups", "group", "state", "entry", "step", "step", "tensor", "tensor"]
        ),
        label="state_dict: where",
    )
    if where == "top":
        how = ex.draw(
            st.sampled_from(["replace", "del state", "del param_groups", "extra"]), label="top: how"
        )
        if how == "replace":
            return ex.draw(st.one_of(garbage(True), st.just([sd])), label="sd")
        if how == "extra":
            sd["extra"] = 1
        else:
            sd.pop(how[4:], None)
    elif where == "groups":
        how = ex.draw(
            st.sampled_from(["garbage", "drop", "duplicate", "dict"]), label="param_groups: how"
        )
        g = sd["param_groups"]
        sd["param_groups"] = {
            "garbage": lambda: ex.draw(garbage(True), label="groups"),
            "drop": lambda: g[:-1],
            "duplicate": lambda: g + g[-1:],
            "dict": lambda: dict(enumerate(g)),
        }[how]()
    elif where == "group":
        g = ex.pick(sd["param_groups"], "which group")
        how = ex.draw(
            st.sampled_from(
                ["option", "option", "del option", "params", "del params", "not a dict"]
            ),
            label="group: how",
        )
        if how == "option":
            key = ex.draw(st.sampled_from(T_OPTION_KEYS), label="option")
            g[key] = ex.draw(garbage(True), label=f"{key} (garbage)")
        elif how == "del option":
            g.pop(ex.draw(st.sampled_from(T_OPTION_KEYS), label="option"), None)
        elif how == "params":
            g["params"] = ex.draw(
                st.one_of(
                    garbage(True),
                    st.just(list(g["params"]) * 2),
                    st.just([str(i) for i in g["params"]]),
                    st.just([i + 100 for i in g["params"]]),
                ),
                label="group params",
            )
        elif how == "del params":
            del g["params"]
        else:
            sd["param_groups"][sd["param_groups"].index(g)] = ex.draw(garbage(True), label="group")
    elif where == "state":
        how = ex.draw(st.sampled_from(["garbage", "unknown key", "list"]), label="state: how")
        if how == "garbage":
            sd["state"] = ex.draw(garbage(True), label="state")
        elif how == "unknown key":
            sd["state"][ex.draw(st.sampled_from([99, -1, "0", None, 0.5]))] = {"step": 1}
        else:
            sd["state"] = list(sd["state"].values())
    elif sd["state"]:
        key = ex.draw(st.sampled_from(sorted(sd["state"], key=repr)), label="which entry")
        entry = sd["state"][key]
        if where == "entry":
            how = ex.draw(
                st.sampled_from(["garbage", "del step", "del exp_avg", "extra"]), label="entry: how"
            )
            if how == "garbage":
                sd["state"][key] = ex.draw(garbage(True), label="entry")
            elif how == "extra":
                entry["bogus"] = torch.zeros(3)
            else:
                entry.pop(how[4:], None)
        elif where == "step":
            entry["step"] = ex.draw(
                st.sampled_from(T_STEP_GARBAGE()).map(lambda f: f()), label="step (garbage)"
            )
        else:
            k = ex.draw(
                st.sampled_from(["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]), label="tensor"
            )
            p = (
                [q for g in case.opt.param_groups for q in g["params"]][key]
                if isinstance(key, int) and key < len(case.params)
                else case.params[0]
            )
            entry[k] = _t_state_garbage(ex, p, entry, case)
    return sd
