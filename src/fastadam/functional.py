"""The functional step: one fused C pass over one parameter tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _core
from ._options import check_flag, check_options, check_step, check_threads

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

RULE_ADAM = _core.RULE_NAMES.index("adam")
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def adam_plan_options(o, eps_root=0.0, ema_decay=None):
    """_Plan.set_options' arguments (after the group index) for checked Adam options:
    csrc/rules/adam.h's hyperparameter order."""
    return (
        o.lr,
        o.weight_decay,
        o.maximize,
        ema_decay,
        (
            o.beta1,
            o.beta2,
            o.eps,
            o.decoupled_weight_decay,
            o.amsgrad,
            o.bias_correction,
            o.eps_mode,
            eps_root,
        ),
    )


__all__ = ["adam_step"]


def adam_step(
    param: ArrayLike,
    grad: ArrayLike,
    exp_avg: ArrayLike,
    exp_avg_sq: ArrayLike,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sq: ArrayLike | None = None,
    maximize: bool = False,
    bias_correction: bool = True,
    eps_mode: str = "paper",
    num_threads: int | None = None,
    grad_scale: float = 1.0,
    skip_nonfinite: bool = False,
) -> bool:
    r"""One Adam step, in place, in a single fused pass (GIL released).

    With alpha = ``lr``, (beta1, beta2) = ``betas``, epsilon = ``eps``, lambda =
    ``weight_decay`` and t = ``step``::

        m <- beta1 * m + (1 - beta1) * g          (exp_avg)
        v <- beta2 * v + (1 - beta2) * g**2       (exp_avg_sq)
        p <- p - alpha * m_hat / (sqrt(v_hat) + epsilon),
             m_hat = m / (1 - beta1**t),  v_hat = v / (1 - beta2**t)

    The exact order of operations, the ``eps_mode="hat"`` variant, weight decay (L2, or
    decoupled as in AdamW), AMSGrad and maximize are specified by
    :func:`fastadam.reference.adam_step`, whose results this function reproduces bit for
    bit on every SIMD path and thread count.

    Parameters
    ----------
    param, exp_avg, exp_avg_sq : writable C-contiguous arrays (or buffer-protocol objects)
        of one dtype, float32 or float64, updated in place. Start exp_avg, exp_avg_sq at 0.
    grad : C-contiguous array of the same dtype and shape; read only. It may not share
        memory with any buffer written.
    step : int >= 1, the step being taken (t). No hidden counter: pass 1, 2, 3, ...
    max_exp_avg_sq : like exp_avg_sq; required (and updated) when ``amsgrad=True``,
        ignored otherwise.
    grad_scale : gradients are divided by this inside the pass (loss scaling); 1 = none.
    skip_nonfinite : if True, first check grad (one read pass); if it holds an inf or NaN,
        change nothing and return False.
    num_threads : OpenMP threads (None: OpenMP's default). Does not change the result.

    Returns
    -------
    bool
        True if the step was taken (always, unless ``skip_nonfinite`` found inf/NaN).

    Raises
    ------
    TypeError, ValueError
        naming the argument, before any buffer is written.
    """
    if grad is None:
        raise TypeError(
            "grad must be a float32 or float64 array, got None (None skips a "
            "parameter only in Adam.step)"
        )
    options = check_options(
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
    step = check_step(step)
    nt = check_threads(num_threads)
    return _step(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        max_exp_avg_sq,
        options,
        step,
        nt,
        skip_nonfinite=check_flag("skip_nonfinite", skip_nonfinite),
    )


def _step(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    options,
    step,
    num_threads,
    isa=-1,
    chunk=0,
    skip_nonfinite=False,
    prefetch=-1,
):
    """adam_step after argument checks; isa, chunk and prefetch let tests force a path,
    a split and software prefetching (-1 auto, 0 off, 1 on)."""
    plan = _core._Plan(
        RULE_ADAM,
        ADAM_STATE,
        [param],
        [(exp_avg, exp_avg_sq, max_exp_avg_sq if options.amsgrad else None)],
        None,
        [0],
        1,
        True,
    )
    plan.set_options(0, *adam_plan_options(options))
    plan.set_step(0, step - 1)
    stepped, _ = plan.step(
        [grad], num_threads, chunk, isa, options.grad_scale, skip_nonfinite, 0.0, prefetch
    )
    return stepped
