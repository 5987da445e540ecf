"""NAdam (Adam with Nesterov momentum): the executable specification.

Algorithm (Dozat, 2016, "Incorporating Nesterov Momentum into Adam", with the momentum
schedule of torch.optim.NAdam's documentation), for step t >= 1 with gradient g_t, step
size gamma (``lr``), decay rates beta1, beta2, momentum decay psi, epsilon and weight
decay lambda. The per-parameter scalar state mu_product (Pi mu_i) starts at 1::

    mu_t      = beta1 * (1 - 0.5 * 0.96^(t psi))
    mu_{t+1}  = beta1 * (1 - 0.5 * 0.96^((t+1) psi))
    Pi_t      = Pi_{t-1} * mu_t                   (the new mu_product)
    g <- +/- g_t / grad_scale                     (minus when maximize)
    g <- g + lambda * p                           (L2 decay, when lambda != 0 and not decoupled)
    p <- p * (1 - gamma * lambda)                 (decoupled decay, NAdamW, instead)
    m <- m + (1 - beta1) * (g - m)                (= beta1*m + (1-beta1)*g, torch's lerp)
    v <- v * beta2 + ((1 - beta2) * g) * g
    d <- sqrt(v * [1 / (1 - beta2^t)]) + epsilon
    p <- p - ([gamma (1 - mu_t) / (1 - Pi_t)] * g) / d
    p <- p - ([gamma mu_{t+1} / (1 - Pi_t mu_{t+1})] * m) / d

The bracketed scalars, mu_t, mu_{t+1} and Pi_t are computed once per step in double
precision, with torch's expressions in torch's order, and the brackets rounded once to the
element type T; every other operation is one IEEE-754 operation in T in the order written
in :func:`nadam_step`.

Source: torch 2.13 ``torch.optim.nadam._single_tensor_nadam`` (foreach=False,
capturable=False, differentiable=False).

mu_product. torch keeps it per parameter as a 0-d tensor of torch's *default* dtype
(float32 unless torch.set_default_dtype(torch.float64); even for float64 parameters) and
updates it with ``mu_product *= mu``: the product is rounded to that dtype (and mu,
a Python float, is first rounded to it too). Here it is a double: the caller passes the
value before the step (1.0 before step 1) and :func:`nadam_step` returns
``mu_product * mu_t`` rounded to double. This is torch's arithmetic exactly when torch's
default dtype is float64; with torch's float32 default the two drift apart by at most
2**-23 relative per step (two float32 roundings; measured: under a fifth of that), which
changes the first bracket by mu_product/(1 - mu_product) times that: under an ulp of
float32 per step for the default betas (mu_product <= 0.46 from step 1 on, about 0.46**t
later) and nothing once it is tiny (torch's float32 copy is subnormal from step 111 and 0
from step 132, where the double goes on to 1e-101 at step 300: 1 - mu_product is 1
either way).

Deliberate differences from torch's single-tensor code:

* ``v * [1/(1 - beta2^t)]`` where torch divides ``v / (1 - beta2^t)`` (a per-step scalar:
  one division less per element): at most about one ulp of v, half an ulp of the root,
  per step.
* torch's CPU kernels fuse the multiply-adds of ``lerp_`` (fma(w, g - m, m) with
  w = 1 - beta1, or fma(w - 1, g - m, g) when w >= 0.5), of ``addcmul_`` (fma((1-beta2)*g,
  g, v*beta2)) and of the L2 ``add(p, alpha=lambda)``; here every product is rounded (the
  C kernels must not fuse): half an ulp of m, v or g per step.
* the two addcdiv updates are torch's ``p + ((-c)*x)/d``, in torch's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._options import _real
from ._common import check_arrays, check_betas, check_flag, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["NAdamConstants", "nadam_constants", "nadam_step"]


class NAdamConstants(NamedTuple):
    """The per-step scalars of NAdam, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on (not decoupled), else 0.
    param_decay: 1 - gamma*lambda when decay is decoupled, else 1.
    one_minus_beta1: 1 - beta1 (m's interpolation weight).
    beta2: v's decay.
    one_minus_beta2: 1 - beta2.
    inv_bias_correction2: 1 / (1 - beta2**t).
    eps: epsilon, added to the root.
    mu: mu_t = beta1 * (1 - 0.5 * 0.96**(t * psi)).
    mu_next: mu_{t+1} = beta1 * (1 - 0.5 * 0.96**((t + 1) * psi)).
    mu_product: Pi_t = mu_product_before * mu_t, the state after this step.
    grad_step: gamma * (1 - mu_t) / (1 - Pi_t), the factor of g.
    avg_step: gamma * mu_{t+1} / (1 - Pi_t * mu_{t+1}), the factor of m.
    l2: L2 decay (g <- g + lambda*p).
    decoupled: decoupled decay (p <- p * param_decay).
    """

    grad_mul: float
    l2_weight_decay: float
    param_decay: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    inv_bias_correction2: float
    eps: float
    mu: float
    mu_next: float
    mu_product: float
    grad_step: float
    avg_step: float
    l2: bool
    decoupled: bool


def nadam_constants(
    step,
    *,
    lr=2e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    momentum_decay=4e-3,
    decoupled_weight_decay=False,
    maximize=False,
    grad_scale=1.0,
    mu_product,
) -> NAdamConstants:
    """Check the hyperparameters (torch's rules) and compute the per-step constants.

    mu_product: the per-parameter product of the mu's before this step (1.0 before step
    1), a real number in [0, 1]. The new one is the field ``mu_product``.
    """
    t = float(check_step(step))
    lr = check_nonneg("lr", lr)
    beta1, beta2 = check_betas(betas)
    eps = check_nonneg("eps", eps)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    momentum_decay = check_nonneg("momentum_decay", momentum_decay)
    decoupled = check_flag("decoupled_weight_decay", decoupled_weight_decay)
    prev = _real("mu_product", mu_product)
    if not 0.0 <= prev <= 1.0:
        raise ValueError(f"mu_product must be in [0, 1] (1.0 before step 1), got {prev}")
    gm = grad_mul(maximize, grad_scale)
    # torch's expressions, in torch's order (Python evaluates left to right).
    bias_correction2 = 1.0 - beta2**t
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1.0) * momentum_decay)))
    mu_product_new = prev * mu
    mu_product_next = mu_product_new * mu_next
    # mu < beta1 < 1 and prev <= 1, so neither denominator is 0.
    grad_step = lr * (1.0 - mu) / (1.0 - mu_product_new)
    avg_step = lr * mu_next / (1.0 - mu_product_next)
    l2 = weight_decay != 0.0 and not decoupled
    dec = weight_decay != 0.0 and decoupled
    return NAdamConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay if l2 else 0.0,
        param_decay=1.0 - lr * weight_decay if dec else 1.0,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        inv_bias_correction2=1.0 / bias_correction2,
        eps=eps,
        mu=mu,
        mu_next=mu_next,
        mu_product=mu_product_new,
        grad_step=grad_step,
        avg_step=avg_step,
        l2=l2,
        decoupled=dec,
    )


def nadam_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    exp_avg: NDArray[np.floating[Any]],
    exp_avg_sq: NDArray[np.floating[Any]],
    *,
    step: int,
    mu_product: float,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
) -> float:
    """One NAdam step in place (param, exp_avg, exp_avg_sq; both zero before step 1).

    mu_product: the parameter's product of mu's before this step (1.0 before step 1).
    Returns the new mu_product (``mu_product * mu_t`` in double), to pass to the next
    step.

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        p = p * T(param_decay)                    if decoupled
        m = m + T(one_minus_beta1) * (g - m)
        v = v * T(beta2) + (T(one_minus_beta2) * g) * g
        d = sqrt(v * T(inv_bias_correction2)) + T(eps)
        p = p - (T(grad_step) * g) / d
        p = p - (T(avg_step) * m) / d
    """
    c = nadam_constants(
        step,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        momentum_decay=momentum_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        grad_scale=grad_scale,
        mu_product=mu_product,
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
        d = np.sqrt(v * T(c.inv_bias_correction2)) + T(c.eps)
        p = p - (T(c.grad_step) * g) / d
        p = p - (T(c.avg_step) * m) / d
        exp_avg[...] = m
        exp_avg_sq[...] = v
        param[...] = p
    return c.mu_product
