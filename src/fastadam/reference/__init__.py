"""The executable specification of fastadam: every update rule in plain NumPy.

One module per rule; each function updates its arrays in place with exactly the
operations, in exactly the order, that the C kernels perform, so that the kernels can
be tested against it bit for bit (``numpy.array_equal``) on every SIMD path and thread
count. Speed is not a goal here.
"""
from .adam import StepConstants, adam_step, step_constants

__all__ = ["adam_step", "step_constants", "StepConstants"]
