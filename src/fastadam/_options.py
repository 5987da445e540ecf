"""Checking and normalising user arguments (plain Python, shared by every entry point).

Every function raises TypeError (wrong kind of value) or ValueError (value out of
range) naming the argument, and is called before any buffer is touched.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ._core import same_options

EPS_MODES = {"paper": 0, "hat": 1}
MAX_THREADS = 2**31 - 1  # num_threads is a C int


class Options(NamedTuple):
    """Hyperparameters of one group, checked, in the order _core._Plan.set_options takes."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    amsgrad: bool
    maximize: bool
    bias_correction: bool
    eps_mode: int
    grad_scale: float = 1.0


def _kind(value):
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and shape != ():
        return f"{type(value).__name__} of shape {shape}"
    return type(value).__name__


def _real(name, value):
    """A Python or NumPy real scalar (not a bool) as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a scalar), got {_kind(value)}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError, ArithmeticError) as e:
        raise TypeError(
            f"{name} must be a real number, got {type(value).__name__} that float() refuses ({e})"
        ) from None


def _flag(name, value):
    """A Python or NumPy bool (or an integer used as one) as a bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, float):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_kind(value)}")


def check_flag(name, value) -> bool:
    return _flag(name, value)


def check_eps_mode(eps_mode) -> int:
    """'paper' or 'hat' (a ValueError lists them for anything else, hashable or not)."""
    if isinstance(eps_mode, str) and eps_mode in EPS_MODES:
        return EPS_MODES[eps_mode]
    raise ValueError(f"eps_mode must be one of {', '.join(map(repr, EPS_MODES))}; got {eps_mode!r}")


def check_options(
    lr,
    betas,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    bias_correction,
    eps_mode,
    grad_scale=1.0,
) -> Options:
    lr = _real("lr", lr)
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    beta1, beta2 = _real("betas[0]", beta1), _real("betas[1]", beta2)
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"betas[0] (beta1) must be in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"betas[1] (beta2) must be in [0, 1), got {beta2}")
    eps = _real("eps", eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    weight_decay = _real("weight_decay", weight_decay)
    if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    grad_scale = check_grad_scale(grad_scale)
    mode = check_eps_mode(eps_mode)
    return Options(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        _flag("decoupled_weight_decay", decoupled_weight_decay),
        _flag("amsgrad", amsgrad),
        _flag("maximize", maximize),
        _flag("bias_correction", bias_correction),
        mode,
        grad_scale,
    )


def check_eps_root(eps_root) -> float:
    """optax's epsilon inside the square root: a finite number >= 0 (0: none)."""
    eps_root = _real("eps_root", eps_root)
    if not (eps_root >= 0.0 and math.isfinite(eps_root)):
        raise ValueError(f"eps_root must be a finite number >= 0, got {eps_root}")
    return eps_root


def check_ema_decay(ema_decay):
    """None (no temporal average) or a number in [0, 1)."""
    if ema_decay is None:
        return None
    ema_decay = _real("ema_decay", ema_decay)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be None or a number in [0, 1), got {ema_decay}")
    return ema_decay


def check_grad_scale(grad_scale) -> float:
    """The loss scale gradients are divided by: a finite number > 0."""
    grad_scale = _real("grad_scale", grad_scale)
    if not (grad_scale > 0.0 and math.isfinite(grad_scale)):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale}")
    return grad_scale


def check_max_norm(max_norm, name="max_grad_norm", allow_none=True):
    """None (no clipping, if allow_none) or a finite number > 0."""
    if max_norm is None and allow_none:
        return None
    max_norm = _real(name, max_norm)
    if not (max_norm > 0.0 and math.isfinite(max_norm)):
        raise ValueError(
            f"{name} must be a finite number > 0{' or None' * allow_none}, got {max_norm}"
        )
    return max_norm


def clip_coefficient(norm, max_norm):
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), capped at 1.
    (_core._Plan.step applies the same formula inside its GIL-free section.)"""
    return min(max_norm / (norm + 1e-6), 1.0)


def check_step(step) -> int:
    """The functional API's t: an integer, 1 <= t < 2**62 (every step count of fastadam is
    below 2**62, so that no count can overflow int64)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer >= 1 (the paper's t), got {_kind(step)}")
    step = int(step)
    if step < 1:
        raise ValueError(f"step must be >= 1 (the paper's t), got {step}")
    if step >= 2**62:
        raise ValueError(f"step must be < 2**62, got {step}")
    return step


def check_count(name, value) -> int:
    """A step count of a state dict: an integer (or a float with an integral value, as
    torch writes them), 0 <= count < 2**62, so that counting on never overflows int64."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer >= 0, got {value!r}")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or v != math.floor(v):
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        value = int(v)
    else:
        raise TypeError(f"{name} must be an integer >= 0, got {_kind(value)}")
    if not 0 <= value < 2**62:
        raise ValueError(f"{name} must be >= 0 and < 2**62, got {value}")
    return value


def check_threads(num_threads) -> int:
    """None -> 0 (OpenMP's default); else an int in [1, 2**31 - 1]."""
    if num_threads is None:
        return 0
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an int >= 1 or None, got {_kind(num_threads)}")
    if not 1 <= num_threads <= MAX_THREADS:  # type: ignore[operator]  # Integral: no __ge__
        raise ValueError(f"num_threads must be None or an int in [1, 2**31 - 1], got {num_threads}")
    return int(num_threads)


def _types(values):
    """The classes of values, and of the elements of tuples among them (betas)."""
    return tuple(v.__class__ if v.__class__ is not tuple else tuple(map(type, v)) for v in values)


def changed(keys, applied) -> bool:
    """keys != applied (both: one tuple of options per group), for any values a user may
    have put in a param group: a comparison that raises (a signalling-NaN Decimal, say)
    counts as changed, so that the options are checked again and the value is refused
    with a clear error; so does a value of another type that compares equal (0.0 where
    False was applied: a float is not a flag). Objects identical to the applied ones (a
    group left alone) cost one identity test each, in C."""
    if same_options(keys, applied):  # the common case: every group left alone
        return False
    try:
        if keys != applied:
            return True
    except Exception:
        return True
    for k, a in zip(keys, applied):
        if _types(k) != _types(a):
            return True
    return False
