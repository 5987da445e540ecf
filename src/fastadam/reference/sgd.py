"""SGD with momentum, dampening, Nesterov and L2 weight decay: the executable specification.

Algorithm (torch.optim.SGD's documented form; momentum as in Sutskever et al. 2013, "On
the importance of initialization and momentum in deep learning"), for step t >= 1 with
gradient g_t, learning rate gamma (``lr``), momentum mu, dampening tau and weight decay
lambda::

    g <- +/- g_t / grad_scale                     (minus when maximize)
    g <- g + lambda * p                           (L2 weight decay, when lambda != 0)
    if mu != 0:
        b <- g                                    (t = 1: torch's first step, undampened)
        b <- b * mu + (1 - tau) * g               (t > 1)
        u <- g + mu * b                           (nesterov)
        u <- b                                    (otherwise)
    else:
        u <- g
    p <- p - gamma * u

Source: torch 2.13 ``torch.optim.sgd._single_tensor_sgd`` (foreach=False). Every scalar is
rounded once to the element type T; every other operation is one IEEE-754 operation in T,
in exactly the order written in :func:`sgd_step`. The per-step constants are the
fields of :class:`SGDConstants`; ``first`` (t = 1), ``momentum`` (mu != 0), ``nesterov``
and ``l2`` are kernel variants, never per-element branches.

torch keeps no momentum buffer before the first step and creates it as a copy of g; here
the caller passes a zero-initialised buffer (``np.zeros_like(param)``) and ``step=1``
selects the variant ``b <- g``, so both hold the same buffer after every step. With
momentum == 0 there is no buffer (pass None, or anything: it is not read).

Deliberate differences from torch's single-tensor code: none in the order of operations.
torch's CPU kernel for ``add(x, alpha=a)`` (L2 decay ``g + lambda*p``, the dampened
buffer ``b*mu + (1-tau)*g``, Nesterov's ``g + mu*b`` and the update ``p - gamma*u``) is a
fused multiply-add (measured on torch 2.13, x86-64); here each is a rounded product then a
rounded sum (the C kernels must not fuse: they give the same bits on every SIMD path), so
each such operation may differ from torch's by half an ulp of its result: about one ulp
of p per step (two with L2 and momentum), and nothing when the product is exact
(``(1 - 0) * g`` without dampening).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._common import check_arrays, check_finite, check_flag, check_nonneg, check_step, grad_mul

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["SGDConstants", "sgd_constants", "sgd_step"]


class SGDConstants(NamedTuple):
    """The per-step scalars of SGD, in double precision, field by field:

    grad_mul: (-1 if maximize else 1) / grad_scale, the first operation's factor.
    l2_weight_decay: lambda when L2 decay is on, else 0.
    momentum_coef: mu (0 without momentum).
    one_minus_dampening: 1 - tau.
    lr: gamma.
    l2: lambda != 0 (the variant g <- g + lambda*p).
    momentum: mu != 0 (the buffer is read and written).
    first: momentum and t == 1 (the variant b <- g).
    nesterov: the Nesterov variant u <- g + mu*b.
    """

    grad_mul: float
    l2_weight_decay: float
    momentum_coef: float
    one_minus_dampening: float
    lr: float
    l2: bool
    momentum: bool
    first: bool
    nesterov: bool


def sgd_constants(
    step,
    *,
    lr=1e-3,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    grad_scale=1.0,
) -> SGDConstants:
    """Check the hyperparameters (torch's rules) and compute the per-step constants."""
    t = check_step(step)
    lr = check_nonneg("lr", lr)
    momentum = check_nonneg("momentum", momentum)
    dampening = check_finite("dampening", dampening)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    nesterov = check_flag("nesterov", nesterov)
    if nesterov and (momentum == 0.0 or dampening != 0.0):
        raise ValueError(
            "nesterov=True requires momentum > 0 and dampening == 0, got "
            f"momentum={momentum}, dampening={dampening}"
        )
    gm = grad_mul(maximize, grad_scale)
    use_momentum = momentum != 0.0
    return SGDConstants(
        grad_mul=gm,
        l2_weight_decay=weight_decay,
        momentum_coef=momentum,
        one_minus_dampening=1.0 - dampening,
        lr=lr,
        l2=weight_decay != 0.0,
        momentum=use_momentum,
        first=use_momentum and t == 1,
        nesterov=nesterov,
    )


def sgd_step(
    param: NDArray[np.floating[Any]],
    grad: ArrayLike,
    momentum_buffer: NDArray[np.floating[Any]] | None = None,
    *,
    step: int,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    grad_scale: float = 1.0,
):
    """One SGD step in place (param and, with momentum, momentum_buffer).

    momentum_buffer: zero-initialised before step 1 (torch's ``momentum_buffer`` after
    each step); required when momentum != 0, not read otherwise. Returns None.

    The exact per-element operations, in T (each constant rounded once to T)::

        g = grad * T(grad_mul)
        g = g + T(l2_weight_decay) * p            if l2
        if momentum:
            b = g                                 if first
            b = b * T(momentum_coef) + T(one_minus_dampening) * g     otherwise
            u = g + T(momentum_coef) * b          if nesterov, else u = b
        else:
            u = g
        p = p - T(lr) * u
    """
    c = sgd_constants(
        step,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        grad_scale=grad_scale,
    )
    if c.momentum and momentum_buffer is None:
        raise ValueError(
            "momentum_buffer is required when momentum != 0 (np.zeros_like(param) before step 1)"
        )
    T, param, grad, st = check_arrays(
        param, grad, momentum_buffer=momentum_buffer if c.momentum else None
    )
    buf = st["momentum_buffer"]
    with np.errstate(all="ignore"):  # IEEE semantics for inf/NaN
        p = param
        g = grad * T(c.grad_mul)
        if c.l2:
            g = g + T(c.l2_weight_decay) * p
        if c.momentum:
            if c.first:
                b = g
            else:
                b = buf * T(c.momentum_coef) + T(c.one_minus_dampening) * g
            u = g + T(c.momentum_coef) * b if c.nesterov else b
            buf[...] = b
        else:
            u = g
        param[...] = p - T(c.lr) * u
