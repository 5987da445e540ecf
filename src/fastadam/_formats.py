"""Storage formats: the optimizer-wide options and the per-parameter decision (plain
Python: no torch, no ml_dtypes; shared by optim.py and torch.py).

docs/formats.md is the contract. Four optimizer-wide options (not group options):

* ``master_weights`` (bool): keep a float32 copy (``master_param``) of every 16-bit
  parameter; the rule updates it and the 16-bit parameter is stored as its rounded image.
* ``state_dtype``: the storage of the rule's state streams: None (float64 for float64
  parameters, float32 for float32 ones, the parameter's own dtype for 16-bit ones without
  master weights, float32 with them), ``"float32"``, ``"bfloat16"`` or ``"8bit"``
  (blockwise, bitsandbytes' layout; tensors of fewer than ``Q8_MIN_NUMEL`` elements keep
  float32 state). ``"float64"`` is accepted as a synonym of None for float64 parameters.
* ``rounding``: ``"nearest"`` (IEEE nearest-even) or ``"stochastic"``, for every 16-bit
  value stored.
* ``seed``: an int in [0, 2**64), the key of the stochastic rounding's random bits.

A dtype is named by a string ("float32", "float64", "float16", "bfloat16"): use
:func:`dtype_name` on a NumPy dtype, a NumPy scalar type, a torch dtype (recognised by
``str(x)``, without importing torch) or a name. Every check raises TypeError (wrong kind)
or ValueError (a value out of range) naming the argument or the parameter, before any
buffer is touched.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from . import _core
from ._options import _flag

__all__ = [
    "FLOAT_DTYPES",
    "FMT_BF16",
    "FMT_F16",
    "FMT_NATIVE",
    "FMT_Q8_SIGNED",
    "FMT_Q8_UNSIGNED",
    "Q8_BLOCK",
    "Q8_MIN_NUMEL",
    "ROUNDINGS",
    "STATE_DTYPES",
    "Formats",
    "ParamFormat",
    "check_formats",
    "check_master_needed",
    "check_master_weights",
    "check_rounding",
    "check_seed",
    "check_state_dtype",
    "dtype_name",
    "fmt_dtype",
    "grad_format",
    "is_q8",
    "param_format",
    "state_layout",
]

# The C core's storage formats (_core.pyx)
FMT_NATIVE = _core.FMT_NATIVE  # the plan's compute dtype
FMT_BF16 = _core.FMT_BF16  # bfloat16 bits in a 2-byte buffer
FMT_F16 = _core.FMT_F16  # IEEE float16
FMT_Q8_SIGNED = _core.FMT_Q8_SIGNED  # uint8 codes, signed dynamic map, absmax per block
FMT_Q8_UNSIGNED = _core.FMT_Q8_UNSIGNED  # uint8 codes, unsigned map
Q8_BLOCK = _core.Q8_BLOCK  # elements per float32 absmax
Q8_MIN_NUMEL = 4096  # smaller tensors keep float32 state under "8bit" (bitsandbytes' rule)

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")  # parameter dtypes
HALF_DTYPES = ("float16", "bfloat16")
STATE_DTYPES = (None, "float32", "float64", "bfloat16", "8bit")
ROUNDINGS = ("nearest", "stochastic")

_HALF_FMT = {"float16": FMT_F16, "bfloat16": FMT_BF16}
_FMT_DTYPE = {
    FMT_BF16: "bfloat16",
    FMT_F16: "float16",
    FMT_Q8_SIGNED: "uint8",
    FMT_Q8_UNSIGNED: "uint8",
}
_TORCH_NAMES = {"float": "float32", "double": "float64", "half": "float16"}


class Formats(NamedTuple):
    """The optimizer-wide format options, checked (see :func:`check_formats`)."""

    master_weights: bool = False
    state_dtype: str | None = None  # None, "float32", "float64", "bfloat16" or "8bit"
    rounding: str = "nearest"
    seed: int = 0

    @property
    def stochastic(self) -> bool:
        return self.rounding == "stochastic"

    def as_dict(self) -> dict:
        """The ``state_dict()["formats"]`` entry: plain Python values."""
        return {
            "master_weights": self.master_weights,
            "state_dtype": self.state_dtype,
            "rounding": self.rounding,
            "seed": self.seed,
        }


class ParamFormat(NamedTuple):
    """How one parameter is stored and updated (see :func:`param_format`)."""

    param: int  # FMT_NATIVE, FMT_BF16 or FMT_F16
    states: tuple  # one FMT_* per state stream of the rule (Rule.state order)
    master: bool  # a float32 master_param is kept
    compute: str  # "float32" or "float64": the plan's compute dtype

    @property
    def native(self) -> bool:
        """Every stream in the compute dtype and no master: today's plan (formats=None)."""
        return (
            not self.master
            and self.param == FMT_NATIVE
            and all(f == FMT_NATIVE for f in self.states)
        )

    def plan_tuple(self) -> tuple:
        """The entry of _core._Plan's ``formats`` list: (param format, state formats...)."""
        return (self.param,) + tuple(self.states)


def _kind(value):
    return type(value).__name__


def dtype_name(x):
    """The name ("float32", "bfloat16", "int64", ...) of a NumPy dtype or scalar type, a
    torch dtype (``str(x) == "torch.float32"``) or a string naming one; None when x is not
    a dtype at all. ml_dtypes' bfloat16 is recognised by its NumPy name, without importing
    ml_dtypes; torch dtypes by their string, without importing torch."""
    if isinstance(x, str):
        if x in FLOAT_DTYPES:
            return x
        if x.startswith("torch."):
            return _TORCH_NAMES.get(x[6:], x[6:])
        try:
            return np.dtype(x).name
        except Exception:
            return None
    if type(x).__module__ == "torch" and str(x).startswith("torch."):
        name = str(x)[6:]
        return _TORCH_NAMES.get(name, name)
    if isinstance(x, (bool, numbers.Number)) or x is None:
        return None
    try:
        return np.dtype(x).name
    except Exception:
        return None


def check_master_weights(value) -> bool:
    return _flag("master_weights", value)


def check_state_dtype(value):
    """None, or one of "float32", "float64", "bfloat16", "8bit" (from NumPy/torch dtypes,
    scalar types or names). Anything else: ValueError for a dtype or string that is not
    one of them, TypeError for something that is not a dtype at all."""
    if value is None:
        return None
    if isinstance(value, str) and value == "8bit":
        return "8bit"
    name = dtype_name(value)
    if name in ("float32", "float64", "bfloat16"):
        return name
    allowed = "None, float32, bfloat16 or '8bit'"
    if name is None and not isinstance(value, str):
        raise TypeError(
            f"state_dtype must be {allowed} (a NumPy or torch dtype, or its "
            f"name), got {_kind(value)} {value!r}"
        )
    hint = (
        " (state_dtype=None keeps a float16 parameter's state in float16)"
        if name == "float16"
        else ""
    )
    raise ValueError(f"state_dtype must be {allowed}, got {value!r}{hint}")


def check_rounding(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"rounding must be 'nearest' or 'stochastic', got {_kind(value)}")
    if value not in ROUNDINGS:
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {value!r}")
    return value


def check_seed(value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"seed must be an int in [0, 2**64), got {_kind(value)}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {value}")
    return value


def check_formats(master_weights=False, state_dtype=None, rounding="nearest", seed=0) -> Formats:
    """The four options checked and normalised (in this order: the first bad one raises)."""
    return Formats(
        check_master_weights(master_weights),
        check_state_dtype(state_dtype),
        check_rounding(rounding),
        check_seed(seed),
    )


def param_format(rule, dtype, numel, formats, where) -> ParamFormat:
    """The storage of one parameter: its format, one format per state stream of ``rule``
    (a fastadam._rules.Rule; the 8-bit map follows ``rule.signed``), whether it keeps a
    master, and its compute dtype.

    dtype: the parameter's dtype name (one of FLOAT_DTYPES; anything else is a TypeError
    naming ``where``); numel: its number of elements; formats: a :class:`Formats`.
    A float64 parameter with a state_dtype other than None/"float64", or a float32/16-bit
    one with state_dtype "float64", is a TypeError naming ``where``."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where}: params must have dtype float32 or float64 (or float16 or "
            f"bfloat16), got {dtype}"
        )
    sd = formats.state_dtype
    n = len(rule.state)
    if dtype == "float64":
        if sd not in (None, "float64"):
            raise TypeError(
                f"{where} is float64: its state is float64 (state_dtype=None); "
                f"state_dtype={sd!r} is for float32, float16 and bfloat16 "
                f"parameters"
            )
        return ParamFormat(FMT_NATIVE, (FMT_NATIVE,) * n, False, "float64")
    if sd == "float64":
        raise TypeError(
            f"{where} is {dtype}: state_dtype='float64' is only for float64 "
            f"parameters (use None or 'float32')"
        )
    half = dtype in HALF_DTYPES
    pfmt = _HALF_FMT[dtype] if half else FMT_NATIVE
    master = bool(formats.master_weights and half)
    if sd is None:
        sfmt = (pfmt if not master else FMT_NATIVE,) * n
    elif sd == "float32":
        sfmt = (FMT_NATIVE,) * n
    elif sd == "bfloat16":
        sfmt = (FMT_BF16,) * n
    elif numel >= Q8_MIN_NUMEL:  # "8bit"
        sfmt = tuple(FMT_Q8_SIGNED if s else FMT_Q8_UNSIGNED for s in rule.signed)
    else:
        sfmt = (FMT_NATIVE,) * n
    return ParamFormat(pfmt, sfmt, master, "float32")


def check_master_needed(formats, dtypes):
    """master_weights=True needs at least one 16-bit parameter (dtypes: their names)."""
    if formats.master_weights and not any(d in HALF_DTYPES for d in dtypes):
        raise ValueError(
            "master_weights=True needs float16 or bfloat16 parameters (float32 "
            "and float64 parameters are their own master); this optimizer has "
            "none"
        )


def fmt_dtype(fmt, compute) -> str:
    """The dtype name of a buffer stored in format ``fmt`` ("uint8" for 8-bit codes)."""
    return compute if fmt == FMT_NATIVE else _FMT_DTYPE[fmt]


def is_q8(fmt) -> bool:
    return fmt in (FMT_Q8_SIGNED, FMT_Q8_UNSIGNED)


def state_layout(rule, pf, shape, names=None, ema=False) -> dict:
    """The state arrays of one parameter: {key: (dtype name, shape)}, in state_dict order.

    names: the state streams present (default: all of rule.state); ema: param_ema kept.
    Keys: ``<stream>`` in its format's dtype (uint8 codes for 8-bit) with the parameter's
    shape, ``<stream>_absmax`` (float32, ceil(n / Q8_BLOCK) elements) for an 8-bit
    stream, ``master_param`` (float32) with master weights, ``param_ema`` (the compute
    dtype). The rule's scalar (NAdam's mu_product) and the step counts are not arrays and
    are not listed."""
    shape = tuple(shape)
    numel = 1
    for d in shape:
        numel *= d
    out = {}
    for k, fmt in zip(rule.state, pf.states):
        if names is not None and k not in names:
            continue
        out[k] = (fmt_dtype(fmt, pf.compute), shape)
        if is_q8(fmt):
            out[k + "_absmax"] = ("float32", (-(-numel // Q8_BLOCK),))
    if pf.master:
        out["master_param"] = ("float32", shape)
    if ema:
        out["param_ema"] = (pf.compute, shape)
    return out


def grad_format(dtype) -> int:
    """The grad_stats format of a gradient of dtype name ``dtype``: FMT_NATIVE for float32
    and float64, FMT_BF16 / FMT_F16 for 16-bit gradients."""
    return _HALF_FMT.get(dtype, FMT_NATIVE)
