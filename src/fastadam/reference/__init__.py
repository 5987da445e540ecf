"""The executable specification of fastadam: every update rule in plain NumPy.

One module per rule; each function updates its arrays in place with exactly the
operations, in exactly the order, that the C kernels perform, so that the kernels can
be tested against it bit for bit (``numpy.array_equal``) on every SIMD path and thread
count. Speed is not a goal here.
"""

from .adagrad import AdagradConstants, adagrad_constants, adagrad_step
from .adam import StepConstants, adam_step, step_constants
from .adamax import AdamaxConstants, adamax_constants, adamax_step
from .ema import ema_update
from .lion import LionConstants, lion_constants, lion_step
from .nadam import NAdamConstants, nadam_constants, nadam_step
from .radam import RAdamConstants, radam_constants, radam_step
from .rmsprop import RMSpropConstants, rmsprop_constants, rmsprop_step
from .sgd import SGDConstants, sgd_constants, sgd_step

__all__ = [
    "AdagradConstants",
    "AdamaxConstants",
    "LionConstants",
    "NAdamConstants",
    "RAdamConstants",
    "RMSpropConstants",
    "SGDConstants",
    "StepConstants",
    "adagrad_constants",
    "adagrad_step",
    "adam_step",
    "adamax_constants",
    "adamax_step",
    "ema_update",
    "lion_constants",
    "lion_step",
    "nadam_constants",
    "nadam_step",
    "radam_constants",
    "radam_step",
    "rmsprop_constants",
    "rmsprop_step",
    "sgd_constants",
    "sgd_step",
    "step_constants",
]
