"""Adagrad: the executable specification.

Algorithm (Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning
and Stochastic Optimization", diagonal version, in the form torch.optim.Adagrad
documents), for step t >= 1 with gradient g_t, learning rate gamma (``lr``), learning-rate
decay eta, weight decay lambda and epsilon::

    g       <- +/- g_t / grad_scale               (minus when maximize)
    g       <- g + lambda * p                     (L2 weight decay, when lambda != 0)
    gamma~  =  gamma / (1 + (t - 1) * eta)        (a per-step scalar, "clr")
    s       <- s + g * g                          (state_sum; starts at
                                                   initial_accumulator_value, torch's
                                                   torch.full_like(p, value))
    p       <- p - (gamma~ * g) / (sqrt(s) + epsilon)

Source: torch 2.13 ``torch.optim.adagrad._single_tensor_adagrad`` (foreach=False, dense
gradients). gamma~ is computed once per step in double precision exactly as torch does
(``lr / (1 + (step - 1) * lr_decay)``) and rounded once to the element type T; every
other operation is one IEEE-754 operation in T in the order written in
:func:`adagrad_step`. The caller creates the state ``sum`` as
``np.full_like(param, initial_accumulator_value)`` (initial_accumulator_value >= 0,
torch's check) before step 1; the step itself does not need the value.

Deliberate differences from torch's single-tensor code: none in the order of operations,
but torch's CPU kernels fuse two of them into a multiply-add (measured on torch 2.13,
x86-64): ``addcmul_(g, g, value=1)`` is fma(1*g, g, s) where this code rounds g*g (half an
ulp of s per step), and for L2 decay ``add(p, alpha=lambda)`` is fma(lambda, p, g) (half an
ulp of g). The C kernels must not fuse: they give the same bits on every SIMD path.
``addcdiv_(g, std, value=-clr)`` is ``p + ((-clr)*g)/std``, exactly this order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["AdagradConstants", "adagrad_constants", "adagrad_step"]


class AdagradConstants(NamedTuple):
    """The per-step scalars of Adagrad, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on, else 0.
    eps: epsilon, added to sqrt(s).
    clr: gamma / (1 + (t - 1) * eta), the decayed step size.
    l2: lambda != 0 (the variant g <- g + lambda*p).
    """

    grad_mul: float
    l2_weight_decay: float
    eps: float
    clr: float
    l2: bool


def adagrad_constants(
    step, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False, grad_scale=1.0
) -> AdagradConstants:
    """Check the hyperparameters (torch's rules) and compute the per-step constants."""
    t = check_step(step)
    lr = check_nonneg("lr", lr)
    lr_decay = check_nonneg("lr_decay", lr_decay)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    eps = check_nonneg("eps", eps)
    gm = grad_mul(maximize, grad_scale)
    return AdagradConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay,
        eps=eps,
        clr=lr / (1.0 + (t - 1) * lr_decay),  # torch's expression; (t - 1) an exact int
        l2=weight_decay != 0.0,
    )


def adagrad_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    state_sum: NDArray[np.floating[Any]],
    *,
    step: int,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One Adagrad step in place (param and state_sum, torch's state ``sum``).

    state_sum: ``np.full_like(param, initial_accumulator_value)`` before step 1. step: the
    1-based step count (torch's state ``step`` after its increment). Returns None.

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        s = s + g * g
        d = sqrt(s) + T(eps)
        p = p - (T(clr) * g) / d
    """
    c = adagrad_constants(
        step,
        lr=lr,
        lr_decay=lr_decay,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    T, param, grad, _ = check_arrays(param, grad, state_sum=state_sum)
    if state_sum is None:
        raise ValueError("state_sum is required")
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        s = state_sum + g * g
        d = np.sqrt(s) + T(c.eps)
        state_sum[...] = s
        param[...] = p - (T(c.clr) * g) / d
