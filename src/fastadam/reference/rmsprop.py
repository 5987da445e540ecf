"""RMSprop (plain, centered, with momentum): the executable specification.

Algorithm (Hinton, Srivastava & Swersky, 2012, "Neural Networks for Machine Learning",
lecture 6e; the centered form from Graves, 2013, "Generating Sequences With Recurrent
Neural Networks"; in the form torch.optim.RMSprop documents), for step t >= 1
with gradient g_t, learning rate gamma (``lr``), smoothing constant alpha, epsilon,
momentum mu and weight decay lambda::

    g   <- +/- g_t / grad_scale                   (minus when maximize)
    g   <- g + lambda * p                         (L2 weight decay, when lambda != 0)
    v   <- v * alpha + ((1 - alpha) * g) * g      (square_avg)
    centered:
        a <- a + (1 - alpha) * (g - a)            (grad_avg; torch's lerp_(g, 1 - alpha))
        d <- sqrt(v - a * a) + epsilon
    otherwise:
        d <- sqrt(v) + epsilon
    mu > 0:
        b <- b * mu + g / d                       (momentum_buffer)
        p <- p - gamma * b
    otherwise:
        p <- p - (gamma * g) / d

All state starts at zero (torch's zeros_like). Source: torch 2.13
``torch.optim.rmsprop._single_tensor_rmsprop`` (foreach=False, capturable=False). Every
scalar is rounded once to the element type T; every other operation is one IEEE-754
operation in T in the order written in :func:`rmsprop_step`. ``l2``, ``centered`` and
``momentum`` are kernel variants.

Deliberate differences from torch's single-tensor code:

* torch's CPU ``lerp_(g, w)`` with w = 1 - alpha is fma(w, g - a, a) when w < 0.5 and
  fma(w - 1, g - a, g) otherwise; here always ``a + T(1 - alpha)*(g - a)`` (as the Adam
  reference), unfused: half an ulp of a per step (about one ulp of ``max(|a|, |g|)`` for
  alpha <= 0.5, where torch takes the other form).
* torch's CPU kernels fuse the multiply-add of ``add(x, alpha=c)`` (L2 decay,
  ``p - gamma*b`` with momentum) and of ``addcmul`` (``v*alpha + ((1-alpha)*g)*g`` is
  fma((1-alpha)*g, g, v*alpha); the centered ``v - a*a`` is fma(-a, a, v)); here every
  product is rounded (the C kernels must not fuse): half an ulp of p, v or v - a*a per step.
* ``b*mu + (1*g)/d`` (addcdiv) and ``p + ((-gamma)*g)/d`` are torch's order exactly.

In the centered variant v - a*a is >= 0 in exact arithmetic (Jensen) but cancels when the
gradient has been nearly constant: with a constant g it is alpha^t (1 - alpha^t) g**2, so
the half ulp of a*a that torch's fused form does not round is amplified by
a*a / (v - a*a) (about 20 after 300 steps with alpha = 0.99 and a constant g; with
alpha = 0.9 it is all rounding noise after ~150 float32 or ~340 float64 steps, in torch
too). It may even round below zero; the square root is then NaN, exactly as in torch (no
clamping, so that both agree).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_flag, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["RMSpropConstants", "rmsprop_constants", "rmsprop_step"]


class RMSpropConstants(NamedTuple):
    """The per-step scalars of RMSprop, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on, else 0.
    alpha: the smoothing constant (v's decay).
    one_minus_alpha: 1 - alpha (weight of the new g*g and of g in the centered average).
    eps: epsilon, added to the root.
    momentum_coef: mu (0 without momentum).
    lr: gamma.
    l2: lambda != 0 (the variant g <- g + lambda*p).
    centered: the centered variant (grad_avg read and written).
    momentum: mu > 0 (momentum_buffer read and written).
    """

    grad_mul: float
    l2_weight_decay: float
    alpha: float
    one_minus_alpha: float
    eps: float
    momentum_coef: float
    lr: float
    l2: bool
    centered: bool
    momentum: bool


def rmsprop_constants(
    step,
    *,
    lr=1e-2,
    alpha=0.99,
    eps=1e-8,
    weight_decay=0.0,
    momentum=0.0,
    centered=False,
    maximize=False,
    grad_scale=1.0,
) -> RMSpropConstants:
    """Check the hyperparameters (torch's rules: every one finite and >= 0) and compute
    the per-step constants (none depends on the step; it is checked all the same)."""
    check_step(step)
    lr = check_nonneg("lr", lr)
    alpha = check_nonneg("alpha", alpha)
    eps = check_nonneg("eps", eps)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    momentum = check_nonneg("momentum", momentum)
    centered = check_flag("centered", centered)
    gm = grad_mul(maximize, grad_scale)
    return RMSpropConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay,
        alpha=alpha,
        one_minus_alpha=1.0 - alpha,
        eps=eps,
        momentum_coef=momentum,
        lr=lr,
        l2=weight_decay != 0.0,
        centered=centered,
        momentum=momentum > 0.0,
    )


def rmsprop_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    square_avg: NDArray[np.floating[Any]],
    momentum_buffer: NDArray[np.floating[Any]] | None = None,
    grad_avg: NDArray[np.floating[Any]] | None = None,
    *,
    step: int,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One RMSprop step in place (param, square_avg [, momentum_buffer] [, grad_avg]).

    All state arrays are zero before step 1. momentum_buffer is required when
    momentum > 0 and grad_avg when centered; otherwise they are not read. Returns None.

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        v = v * T(alpha) + (T(one_minus_alpha) * g) * g
        if centered:
            a = a + T(one_minus_alpha) * (g - a)
            d = sqrt(v - a * a) + T(eps)
        else:
            d = sqrt(v) + T(eps)
        if momentum:
            b = b * T(momentum_coef) + g / d
            p = p - T(lr) * b
        else:
            p = p - (T(lr) * g) / d
    """
    c = rmsprop_constants(
        step,
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    if square_avg is None:
        raise ValueError("square_avg is required")
    if c.momentum and momentum_buffer is None:
        raise ValueError("momentum_buffer is required when momentum > 0")
    if c.centered and grad_avg is None:
        raise ValueError("grad_avg is required when centered=True")
    T, param, grad, _ = check_arrays(
        param,
        grad,
        square_avg=square_avg,
        momentum_buffer=momentum_buffer if c.momentum else None,
        grad_avg=grad_avg if c.centered else None,
    )
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        v = square_avg * T(c.alpha) + (T(c.one_minus_alpha) * g) * g
        if c.centered:
            a = grad_avg + T(c.one_minus_alpha) * (g - grad_avg)
            d = np.sqrt(v - a * a) + T(c.eps)
        else:
            d = np.sqrt(v) + T(c.eps)
        if c.momentum:
            b = momentum_buffer * T(c.momentum_coef) + g / d
            new_p = p - T(c.lr) * b
        else:
            new_p = p - (T(c.lr) * g) / d
        square_avg[...] = v
        if c.centered:
            assert grad_avg is not None  # checked above
            grad_avg[...] = a
        if c.momentum:
            assert momentum_buffer is not None  # checked above
            momentum_buffer[...] = b
        param[...] = new_p
