"""Adamax (Adam with the infinity norm): the executable specification.

Algorithm (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization", section 7.1,
Algorithm 2, with torch's epsilon and L2 decay), for step t >= 1 with gradient g_t, step
size alpha (``lr``), decay rates beta1, beta2, epsilon and weight decay lambda::

    g <- +/- g_t / grad_scale                     (minus when maximize)
    g <- g + lambda * p                           (L2 weight decay, when lambda != 0)
    m <- m + (1 - beta1) * (g - m)                (= beta1*m + (1-beta1)*g, torch's lerp)
    u <- max(u * beta2, |g| + epsilon)            (exp_inf)
    p <- p - ([alpha / (1 - beta1^t)] * m) / u

The bracket ("clr") is computed once per step in double precision, as torch does, and
rounded once to the element type T; every other operation is one IEEE-754 operation in T
in the order written in :func:`adamax_step`. Both states start at zero.

Source: torch 2.13 ``torch.optim.adamax._single_tensor_adamax`` (foreach=False,
capturable=False, differentiable=False).

The maximum is the select ``u*beta2 >= |g|+eps ? u*beta2 : |g|+eps``. For numbers it is
torch.maximum; for NaN it differs: torch.maximum propagates a NaN from either side, the
select propagates a NaN of the new term ``|g|+eps`` (a NaN gradient, or a NaN p through L2
decay) and replaces a NaN already in u by ``|g|+eps`` (a comparison with NaN is false, the
same convention as the Adam reference's AMSGrad maximum). A NaN can only reach u through
a NaN gradient, which has made m (and so p) NaN for good, so the parameters are the same
either way; only u may become finite again.

Deliberate differences from torch's single-tensor code:

* torch's CPU ``lerp_`` is a fused multiply-add, fma(w, g - m, m) with w = 1 - beta1 (and
  fma(w - 1, g - m, g) when w >= 0.5); here ``m + T(1-beta1)*(g - m)`` unfused, as the
  Adam reference (the C kernels must not fuse): half an ulp of m per step.
* torch's CPU ``add(p, alpha=lambda)`` (L2) is fma(lambda, p, g); here the product is
  rounded: half an ulp of g.
* the rest (``u*beta2``, ``|g| + eps``, ``p + ((-clr)*m)/u``, torch's addcdiv) is torch's
  order exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_betas, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["AdamaxConstants", "adamax_constants", "adamax_step"]


class AdamaxConstants(NamedTuple):
    """The per-step scalars of Adamax, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on, else 0.
    one_minus_beta1: 1 - beta1 (m's interpolation weight).
    beta2: u's decay.
    eps: epsilon, added to ``|g|``.
    clr: alpha / (1 - beta1**t), the bias-corrected step size.
    l2: lambda != 0 (the variant g <- g + lambda*p).
    """

    grad_mul: float
    l2_weight_decay: float
    one_minus_beta1: float
    beta2: float
    eps: float
    clr: float
    l2: bool


def adamax_constants(
    step, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False, grad_scale=1.0
) -> AdamaxConstants:
    """Check the hyperparameters (torch's rules) and compute the per-step constants."""
    t = float(check_step(step))
    lr = check_nonneg("lr", lr)
    beta1, beta2 = check_betas(betas)
    eps = check_nonneg("eps", eps)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    gm = grad_mul(maximize, grad_scale)
    return AdamaxConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        eps=eps,
        clr=lr / (1.0 - beta1**t),
        l2=weight_decay != 0.0,
    )


def adamax_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    exp_avg: NDArray[np.floating[Any]],
    exp_inf: NDArray[np.floating[Any]],
    *,
    step: int,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One Adamax step in place (param, exp_avg, exp_inf; both states zero before step 1).

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        m = m + T(one_minus_beta1) * (g - m)
        a = u * T(beta2)
        b = abs(g) + T(eps)
        u = a >= b ? a : b                        (select; see the module on NaN)
        p = p - (T(clr) * m) / u
    """
    c = adamax_constants(
        step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    if exp_avg is None or exp_inf is None:
        raise ValueError("exp_avg and exp_inf are required")
    T, param, grad, _ = check_arrays(param, grad, exp_avg=exp_avg, exp_inf=exp_inf)
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        m = exp_avg + T(c.one_minus_beta1) * (g - exp_avg)
        a = exp_inf * T(c.beta2)
        b = np.abs(g) + T(c.eps)
        u = np.where(a >= b, a, b)
        exp_avg[...] = m
        exp_inf[...] = u
        param[...] = p - (T(c.clr) * m) / u
