"""The temporal average of the parameters (Kingma & Ba 2015, Sec. 7.2), in plain NumPy.

Every optimizer with ``ema_decay=d`` keeps, per parameter, ``param_ema`` (from 0) and
updates it in the same pass as the rule, from the parameter's new value p::

    param_ema <- param_ema * d + (1 - d) * p

in the element type T, with d and 1 - d computed once in double and rounded once to T.
The paper's bias-corrected average after t updates is ``param_ema / (1 - d**t)``
(``averaged_params()``). The average is only written, never read by the rule: it cannot
change the optimizer's trajectory.
"""

from __future__ import annotations

import numpy as np

from .._options import check_ema_decay

__all__ = ["ema_update"]


def ema_update(param_ema, param, ema_decay):
    """param_ema <- param_ema * d + (1 - d) * param, in place (the C kernels' order)."""
    d = check_ema_decay(ema_decay)
    if d is None:
        raise ValueError("ema_decay must be a number in [0, 1), got None")
    param_ema = np.asarray(param_ema)
    param = np.asarray(param)
    if param_ema.dtype != param.dtype or param_ema.shape != param.shape:
        raise ValueError("param_ema must match param's dtype and shape")
    T = param.dtype.type
    with np.errstate(all="ignore"):
        param_ema[...] = param_ema * T(d) + T(1.0 - d) * param
