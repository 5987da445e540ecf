"""The executable specification of fastadam: Adam in plain NumPy, written for clarity.

The C kernels reproduce :func:`adam_step` **bit for bit** (``numpy.array_equal``) on every
SIMD path and thread count. Speed is not a goal here.

Algorithm (Kingma & Ba, 2015, Algorithm 1, in the form torch.optim.Adam documents), for
step t >= 1 with gradient g_t, step size alpha (``lr``), decay rates beta1, beta2,
epsilon and weight decay lambda::

    g   <- +/- g_t / grad_scale                  (minus when maximize)
    g   <- g + lambda * p                        (L2 weight decay, the Adam paper's way)
    p   <- p * (1 - alpha * lambda)              (decoupled weight decay, AdamW, instead)
    m   <- m + (1 - beta1) * (g - m)             (= beta1*m + (1-beta1)*g, torch's lerp form)
    v   <- v * beta2 + ((1 - beta2) * g) * g
    v_max <- v_max >= v ? v_max : v              (AMSGrad; the denominator then uses v_max)

    eps_mode="paper" (default; torch, optax):
        p <- p - [alpha / (1 - beta1^t)] * (m / (sqrt(v) * [1/sqrt(1 - beta2^t)] + epsilon))
      with eps_root > 0 (optax's epsilon inside the square root):
        p <- p - [alpha / (1 - beta1^t)] * (m / (sqrt(v * [1/(1 - beta2^t)] + eps_root) + epsilon))
    eps_mode="hat" (the paper's "efficient version"; TensorFlow/Keras):
        p <- p - [alpha * sqrt(1 - beta2^t) / (1 - beta1^t)] * (m / (sqrt(v) + epsilon_hat))
      with eps_root > 0:
        p <- p - [alpha * sqrt(1 - beta2^t) / (1 - beta1^t)] * (m / (sqrt(v + eps_root) + epsilon_hat))

The bracketed scalars are computed once per step in double precision (`step_constants`)
and rounded once to the element type T (float32 or float64). Every other operation is a
single IEEE-754 operation in T, evaluated exactly in the order written (no fused
multiply-add, no reassociation). With bias_correction=False both brackets become alpha
and 1. A comparison with NaN is false, so a NaN in v reaches v_max (as with torch.maximum).

Compared with torch.optim.Adam (foreach=False) the one deliberate difference is
``sqrt(v) * (1/sqrt(bc2))`` where torch divides ``sqrt(v) / sqrt(bc2)``: one division less
per element, at most about one ulp of the denominator per step.

Non-finite gradients follow IEEE arithmetic: an inf or NaN gradient makes m, v and p
inf/NaN for that element, exactly as in torch; nothing is skipped or clamped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._options import check_eps_root, check_options, check_step

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["StepConstants", "adam_step", "step_constants"]


class StepConstants(NamedTuple):
    """The per-step scalars, in double precision: grad_mul is the C core's common
    constant, the other float fields are csrc/rules/adam.h's constants in its order; the
    flags are its kernel variant."""

    grad_mul: float
    l2_weight_decay: float
    param_decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_sqrt_bias_correction2: float
    eps: float
    step_size: float
    inv_bias_correction2: float
    eps_root: float
    l2: bool
    amsgrad: bool


def step_constants(
    step,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
    maximize=False,
    bias_correction=True,
    eps_mode="paper",
    grad_scale=1.0,
    eps_root=0.0,
) -> StepConstants:
    o = check_options(
        lr,
        betas,
        eps,
        weight_decay,
        decoupled_weight_decay,
        amsgrad,
        maximize,
        bias_correction,
        eps_mode,
        grad_scale,
    )
    eps_root = check_eps_root(eps_root)
    t = float(check_step(step))
    bias_correction1 = 1.0 - o.beta1**t if o.bias_correction else 1.0
    bias_correction2 = 1.0 - o.beta2**t if o.bias_correction else 1.0
    l2 = not o.decoupled_weight_decay and o.weight_decay != 0.0
    decoupled = o.decoupled_weight_decay and o.weight_decay != 0.0
    if o.eps_mode == 1:  # "hat"
        inv_sqrt_bc2 = inv_bc2 = 1.0
        step_size = o.lr * math.sqrt(bias_correction2) / bias_correction1
    else:
        inv_sqrt_bc2 = 1.0 / math.sqrt(bias_correction2)
        inv_bc2 = 1.0 / bias_correction2
        step_size = o.lr / bias_correction1
    return StepConstants(
        grad_mul=(-1.0 if o.maximize else 1.0) / o.grad_scale,
        l2_weight_decay=o.weight_decay if l2 else 0.0,
        param_decay=1.0 - o.lr * o.weight_decay if decoupled else 1.0,
        one_minus_beta1=1.0 - o.beta1,
        beta2=o.beta2,
        one_minus_beta2=1.0 - o.beta2,
        inv_sqrt_bias_correction2=inv_sqrt_bc2,
        eps=o.eps,
        step_size=step_size,
        inv_bias_correction2=inv_bc2,
        eps_root=eps_root,
        l2=l2,
        amsgrad=o.amsgrad,
    )


def adam_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    exp_avg: NDArray[np.floating[Any]],
    exp_avg_sq: NDArray[np.floating[Any]],
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: NDArray[np.floating[Any]] | None = None,
    maximize: bool = False,
    bias_correction: bool = True,
    eps_mode: str = "paper",
    num_threads: int | None = None,
    grad_scale: float = 1.0,
    skip_nonfinite: bool = False,
    eps_root: float = 0.0,
):
    """One Adam step in place, in plain NumPy: the specification of fastadam.adam_step.

    Same signature and results (bit for bit) as :func:`fastadam.adam_step`;
    ``num_threads`` is accepted and ignored. Returns False, changing nothing, when
    ``skip_nonfinite`` and grad holds an inf or NaN; True otherwise.
    """
    c = step_constants(
        step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        bias_correction=bias_correction,
        eps_mode=eps_mode,
        grad_scale=grad_scale,
        eps_root=eps_root,
    )
    param, exp_avg, exp_avg_sq = np.asarray(param), np.asarray(exp_avg), np.asarray(exp_avg_sq)
    grad = np.asarray(grad)
    T = param.dtype.type
    if param.dtype not in (np.float32, np.float64):
        raise TypeError(f"param must have dtype float32 or float64, got {param.dtype}")
    for name, a in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if a.dtype != param.dtype or a.shape != param.shape:
            raise ValueError(f"{name} must match param's dtype and shape")
    if c.amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("max_exp_avg_sq is required when amsgrad=True")
        max_exp_avg_sq = np.asarray(max_exp_avg_sq)

    if skip_nonfinite and not np.isfinite(grad).all():
        return False
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN, as documented
        p = param.copy()
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        p = p * T(c.param_decay)
        m = exp_avg + T(c.one_minus_beta1) * (g - exp_avg)
        v = exp_avg_sq * T(c.beta2) + (T(c.one_minus_beta2) * g) * g
        exp_avg[...] = m
        exp_avg_sq[...] = v
        if c.amsgrad:
            assert max_exp_avg_sq is not None  # checked above
            v = np.where(max_exp_avg_sq >= v, max_exp_avg_sq, v)
            max_exp_avg_sq[...] = v
        if c.eps_root != 0.0:
            denom = np.sqrt(v * T(c.inv_bias_correction2) + T(c.eps_root)) + T(c.eps)
        else:
            denom = np.sqrt(v) * T(c.inv_sqrt_bias_correction2) + T(c.eps)
        param[...] = p - T(c.step_size) * (m / denom)
    return True
