"""Argument checks shared by the reference update rules (plain Python, no arithmetic).

Every check raises TypeError (wrong kind of value) or ValueError (value out of range)
naming the argument, before any array is touched.
"""

from __future__ import annotations

import math

import numpy as np

from .._options import _flag, _real, check_grad_scale, check_step

__all__ = [
    "check_arrays",
    "check_beta",
    "check_betas",
    "check_finite",
    "check_flag",
    "check_grad_scale",
    "check_nonneg",
    "check_step",
    "grad_mul",
]


def check_finite(name, value) -> float:
    """A finite real number (a Python or NumPy scalar, not a bool) as a float."""
    value = _real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_nonneg(name, value) -> float:
    """A finite real number >= 0 as a float."""
    value = _real(name, value)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_beta(name, value, *, closed=False) -> float:
    """A decay rate in [0, 1) (or [0, 1] when closed) as a float."""
    value = _real(name, value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")
    return value


def check_betas(betas, *, closed=False):
    """A pair (beta1, beta2) of decay rates, each checked by check_beta."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    return (
        check_beta("betas[0] (beta1)", beta1, closed=closed),
        check_beta("betas[1] (beta2)", beta2, closed=closed),
    )


def check_flag(name, value) -> bool:
    return _flag(name, value)


def grad_mul(maximize, grad_scale) -> float:
    """The factor every rule's first operation multiplies the gradient by: maximize (a
    sign) and the loss scale folded into one double, -1/grad_scale or 1/grad_scale."""
    return (-1.0 if _flag("maximize", maximize) else 1.0) / check_grad_scale(grad_scale)


def check_arrays(param, grad, **state):
    """Check the arrays of one update and return (T, param, grad, state).

    param and every state array are updated in place, so they must be writeable NumPy
    arrays (a list would be copied and the update lost); grad may be anything
    numpy.asarray accepts. All must have param's dtype (float32 or float64) and shape.
    A state array given as None is left out of the check (the caller decides whether the
    variant needs it). T is the element type (numpy.float32 or numpy.float64).
    """
    if not isinstance(param, np.ndarray):
        raise TypeError(
            f"param must be a numpy.ndarray (updated in place), got {type(param).__name__}"
        )
    if param.dtype not in (np.float32, np.float64):
        raise TypeError(f"param must have dtype float32 or float64, got {param.dtype}")
    grad = np.asarray(grad)
    if grad.dtype != param.dtype or grad.shape != param.shape:
        raise ValueError(
            f"grad must match param's dtype and shape ({param.dtype}, "
            f"{param.shape}), got {grad.dtype}, {grad.shape}"
        )
    for name, a in state.items():
        if a is None:
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{name} must be a numpy.ndarray (updated in place), got {type(a).__name__}"
            )
        if a.dtype != param.dtype or a.shape != param.shape:
            raise ValueError(
                f"{name} must match param's dtype and shape ({param.dtype}, "
                f"{param.shape}), got {a.dtype}, {a.shape}"
            )
    for name, a in (("param", param), *state.items()):
        if a is not None and not a.flags.writeable:
            raise ValueError(f"{name} must be writeable (it is updated in place)")
    return param.dtype.type, param, grad, state
