"""RAdam (rectified Adam): the executable specification.

Algorithm (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
Algorithm 2, with torch's epsilon and weight decay), for step t >= 1 with gradient g_t,
step size gamma (``lr``), decay rates beta1, beta2, epsilon and weight decay lambda::

    rho_inf = 2 / (1 - beta2) - 1
    rho_t   = rho_inf - 2 t beta2^t / (1 - beta2^t)
    g <- +/- g_t / grad_scale                     (minus when maximize)
    g <- g + lambda * p                           (L2 decay, when lambda != 0 and not decoupled)
    p <- p * (1 - gamma * lambda)                 (decoupled decay, as AdamW, instead)
    m <- m + (1 - beta1) * (g - m)                (= beta1*m + (1-beta1)*g, torch's lerp)
    v <- v * beta2 + ((1 - beta2) * g) * g
    rho_t > 5 (rectified):
        r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
        p <- p - [gamma r sqrt(1 - beta2^t) / (1 - beta1^t)] * (m / (sqrt(v) + epsilon))
    otherwise (un-rectified: SGD with momentum):
        p <- p - [gamma / (1 - beta1^t)] * m

rho_t, r and the brackets are computed once per step in double precision (rho_t with
torch's expression in torch's order, so that the test rho_t > 5 takes torch's branch at
every step) and the bracket rounded once to the element type T; every other operation is
one IEEE-754 operation in T in the order written in :func:`radam_step`. ``rectified`` is
a per-step kernel variant. With the default beta2 = 0.999 steps 1 to 5 are un-rectified
(rho_5 = 4.996, rho_6 = 5.994); with beta2 <= 2/3 (rho_inf <= 5) no step is rectified.

Source: torch 2.13 ``torch.optim.radam._single_tensor_radam`` (foreach=False,
capturable=False, differentiable=False).

Deliberate differences from torch's single-tensor code:

* the per-step scalars are folded into one factor. torch computes the update as
  ``(((m / bc1) * gamma) * ((1 / (sqrt(v) + eps)) * sqrt(bc2))) * r`` (five roundings
  after sqrt(v) + eps) and the un-rectified one as ``(m / bc1) * gamma`` (two); here
  ``T(step_size) * (m / (sqrt(v) + eps))`` (two) and ``T(step_size) * m`` (one). The
  result differs from torch's by up to about two ulps of the update per step (the update
  is at most about gamma*r*sqrt(bc2)/bc1 ~ gamma in size).
* torch's CPU kernels fuse the multiply-adds of ``lerp_`` (fma(w, g - m, m) with
  w = 1 - beta1, or fma(w - 1, g - m, g) when w >= 0.5), of ``addcmul_`` (fma((1-beta2)*g,
  g, v*beta2)) and of the L2 ``add(p, alpha=lambda)``; here every product is rounded (the
  C kernels must not fuse): half an ulp of m, v or g per step. (``p.add_(u, alpha=-1)``
  is exact either way.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_betas, check_flag, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["RAdamConstants", "radam_constants", "radam_step"]


class RAdamConstants(NamedTuple):
    """The per-step scalars of RAdam, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on (not decoupled), else 0.
    param_decay: 1 - gamma*lambda when decay is decoupled, else 1.
    one_minus_beta1: 1 - beta1 (m's interpolation weight).
    beta2: v's decay.
    one_minus_beta2: 1 - beta2.
    eps: epsilon, added to sqrt(v) (rectified steps only).
    rho_t: the length of the approximated SMA at step t (informative).
    rect: r when rectified, else 1 (informative; folded into step_size).
    step_size: gamma * sqrt(1 - beta2**t) * r / (1 - beta1**t) when rectified,
    gamma / (1 - beta1**t) otherwise.
    l2: L2 decay (g <- g + lambda*p).
    decoupled: decoupled decay (p <- p * param_decay).
    rectified: rho_t > 5 (the adaptive update; otherwise p <- p - step_size*m).
    """

    grad_mul: float
    l2_weight_decay: float
    param_decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    rho_t: float
    rect: float
    step_size: float
    l2: bool
    decoupled: bool
    rectified: bool


def radam_constants(
    step,
    *,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    maximize=False,
    grad_scale=1.0,
) -> RAdamConstants:
    """Check the hyperparameters (torch's rules) and compute the per-step constants."""
    t = float(check_step(step))
    lr = check_nonneg("lr", lr)
    beta1, beta2 = check_betas(betas)
    eps = check_nonneg("eps", eps)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    decoupled = check_flag("decoupled_weight_decay", decoupled_weight_decay)
    gm = grad_mul(maximize, grad_scale)
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    # torch's expressions, in torch's order (Python evaluates left to right).
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * (beta2**t) / bias_correction2
    rectified = rho_t > 5.0
    if rectified:  # then rho_inf > rho_t > 5: every factor below is positive
        rect = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        step_size = lr * math.sqrt(bias_correction2) * rect / bias_correction1
    else:
        rect = 1.0
        step_size = lr / bias_correction1
    l2 = weight_decay != 0.0 and not decoupled
    dec = weight_decay != 0.0 and decoupled
    return RAdamConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay if l2 else 0.0,
        param_decay=1.0 - lr * weight_decay if dec else 1.0,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        rho_t=rho_t,
        rect=rect,
        step_size=step_size,
        l2=l2,
        decoupled=dec,
        rectified=rectified,
    )


def radam_step(
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
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One RAdam step in place (param, exp_avg, exp_avg_sq; both zero before step 1).

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        p = p * T(param_decay)                    if decoupled
        m = m + T(one_minus_beta1) * (g - m)
        v = v * T(beta2) + (T(one_minus_beta2) * g) * g
        p = p - T(step_size) * (m / (sqrt(v) + T(eps)))     if rectified
        p = p - T(step_size) * m                            otherwise
    """
    c = radam_constants(
        step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    if exp_avg is None or exp_avg_sq is None:
        raise ValueError("exp_avg and exp_avg_sq are required")
    T, param, grad, _ = check_arrays(param, grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        if c.decoupled:
            p = p * T(c.param_decay)
        m = exp_avg + T(c.one_minus_beta1) * (g - exp_avg)
        v = exp_avg_sq * T(c.beta2) + (T(c.one_minus_beta2) * g) * g
        if c.rectified:
            p = p - T(c.step_size) * (m / (np.sqrt(v) + T(c.eps)))
        else:
            p = p - T(c.step_size) * m
        exp_avg[...] = m
        exp_avg_sq[...] = v
        param[...] = p
