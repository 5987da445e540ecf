"""Lion (EvoLved Sign Momentum): the executable specification.

Algorithm (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms", Program 1 /
Algorithm 2), for step t >= 1 with gradient g_t, learning rate eta (``lr``), decay rates
beta1, beta2 and (decoupled) weight decay lambda::

    g <- +/- g_t / grad_scale                     (minus when maximize)
    p <- p * (1 - eta * lambda)                   (decoupled weight decay, when lambda != 0)
    c  = m * beta1 + (1 - beta1) * g              (the interpolation that is signed)
    p <- p - eta * sign(c)
    m <- m * beta2 + (1 - beta2) * g              (exp_avg)

m starts at zero. Every scalar is rounded once to the element type T; every other
operation is one IEEE-754 operation in T in the order written in :func:`lion_step`.
torch has no Lion; the form follows the paper's pseudo-code and the widely used
lion-pytorch (lucidrains): ``exp_avg * beta1 + grad * (1 - beta1)``, then sign, then
``exp_avg * beta2 + grad * (1 - beta2)`` (lion-pytorch writes both as ``mul`` then
``add(grad, alpha=1 - beta)``, which torch's CPU kernel computes as a fused multiply-add;
here the product is rounded, which changes sign(c) only where ``|c|`` is within an ulp of 0,
and m by half an ulp per step).
Since eta * sign(c) is exact (sign(c) is -1, 0 or 1), ``p - eta*sign(c)`` is one rounding,
the same as torch's ``p.add_(sign(c), alpha=-eta)`` fused or not.

sign is the select ``c > 0 ? 1 : (c < 0 ? -1 : c)``:

* sign(+-0) = +-0 (torch.sign gives +0 for both; p - eta*(-0) and p - eta*(+0) differ
  only in the sign of a zero p);
* sign(NaN) = NaN, so a NaN gradient (or a NaN in m) makes p NaN, as in every other rule
  here. torch 2.13's CPU ``torch.sign(nan)`` is 0 (as (0 < x) - (x < 0) would be), which in
  a torch implementation leaves p unchanged and silently freezes the parameter (m stays NaN
  for good); this is a deliberate difference;
* sign(+-inf) = +-1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_betas, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["LionConstants", "lion_constants", "lion_step"]


class LionConstants(NamedTuple):
    """The per-step scalars of Lion, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    param_decay: 1 - eta*lambda when lambda != 0, else 1.
    beta1: m's weight in c.
    one_minus_beta1: g's weight in c.
    beta2: m's decay.
    one_minus_beta2: g's weight in m.
    lr: eta.
    decoupled: lambda != 0 (the variant p <- p * param_decay).
    """

    grad_mul: float
    param_decay: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    lr: float
    decoupled: bool


def lion_constants(
    step, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, grad_scale=1.0
) -> LionConstants:
    """Check the hyperparameters (betas in [0, 1], as lion-pytorch) and compute the
    per-step constants (none depends on the step; it is checked all the same)."""
    check_step(step)
    lr = check_nonneg("lr", lr)
    beta1, beta2 = check_betas(betas, closed=True)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    gm = grad_mul(maximize, grad_scale)
    dec = weight_decay != 0.0
    return LionConstants(
        grad_mul=gm,
        param_decay=1.0 - lr * weight_decay if dec else 1.0,
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        lr=lr,
        decoupled=dec,
    )


def lion_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    exp_avg: NDArray[np.floating[Any]],
    *,
    step: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One Lion step in place (param and exp_avg, zero before step 1). Returns None.

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        p = p * T(param_decay)                    if decoupled
        c = m * T(beta1) + T(one_minus_beta1) * g
        s = c > 0 ? 1 : (c < 0 ? -1 : c)          (selects; sign(NaN) = NaN, sign(+-0) = +-0)
        p = p - T(lr) * s
        m = m * T(beta2) + T(one_minus_beta2) * g
    """
    c = lion_constants(
        step,
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    if exp_avg is None:
        raise ValueError("exp_avg is required")
    T, param, grad, _ = check_arrays(param, grad, exp_avg=exp_avg)
    one = T(1.0)
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.decoupled:
            p = p * T(c.param_decay)
        u = exp_avg * T(c.beta1) + T(c.one_minus_beta1) * g
        s = np.where(u > 0, one, np.where(u < 0, -one, u))
        p = p - T(c.lr) * s
        exp_avg[...] = exp_avg * T(c.beta2) + T(c.one_minus_beta2) * g
        param[...] = p
