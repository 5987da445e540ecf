"""Type stub of the compiled module fastadam._core (src/fastadam/_core.pyx).

Only what the binding exposes; the C-level (cdef) members have no Python name. Arrays are
typed loosely (Any): the binding accepts any object with a buffer of a supported dtype,
and checks each at run time. tests/test_typing.py keeps this file in step with the
compiled module's names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

VERSION: str
DEFAULT_CHUNK: int
ISA_NAMES: tuple[str, ...]
MAX_STEP: int
MAX_THREADS: int
FMT_NATIVE: int
FMT_BF16: int
FMT_F16: int
FMT_Q8_SIGNED: int
FMT_Q8_UNSIGNED: int
Q8_BLOCK: int
Q8_TABLES_OK: bool
RULE_NAMES: tuple[str, ...]
_DTYPE_NAMES: tuple[str, ...]

def _before_fork() -> None: ...
def _after_fork_in_parent() -> None: ...
def _after_fork_in_child() -> None: ...
def forked() -> bool: ...
def isa_index(name: str) -> int: ...
def isa_compiled(isa: int) -> bool: ...
def isa_supported(isa: int) -> bool: ...
def select_isa(isa: int) -> int: ...
def current_isa() -> int: ...
def openmp() -> bool: ...
def max_threads() -> int: ...
def thread_cap() -> int: ...
def prefetch_window() -> tuple[int, int]: ...

class _Plan:
    """Many parameter blocks of one update rule and their state, checked once."""

    @property
    def names(self) -> tuple[str, ...]: ...
    @property
    def arrays(self) -> tuple[Any, ...]: ...
    @property
    def labels(self) -> Any: ...
    last_grad_norm: float | None
    @property
    def formatted(self) -> bool: ...
    def __init__(
        self,
        rule: int,
        names: tuple[str, ...],
        params: list[Any],
        states: list[Any],
        emas: Sequence[Any] | None,
        groups: list[int],
        ngroups: int,
        single: bool = ...,
        labels: Sequence[str] | None = ...,
        step_mirrors: Sequence[Any] | None = ...,
        scalar_mirrors: Sequence[Any] | None = ...,
        ema_mirrors: Sequence[Any] | None = ...,
        formats: Sequence[Any] | None = ...,
        masters: Sequence[Any] | None = ...,
        absmaxes: Sequence[Any] | None = ...,
        stochastic: bool = ...,
        seed: int = ...,
        indices: Sequence[int] | None = ...,
    ) -> None: ...
    @property
    def dtype(self) -> str | None: ...
    def __len__(self) -> int: ...
    @property
    def step_count(self) -> int: ...
    @step_count.setter
    def step_count(self, value: int) -> None: ...
    def get_steps(self) -> list[int | float]: ...
    def get_ema_steps(self) -> list[int | float]: ...
    def set_step(self, i: int, step: int, ema_step: int = ...) -> None: ...
    def set_options(
        self,
        group: int,
        lr: float,
        weight_decay: float,
        maximize: bool,
        ema_decay: float | None,
        hyper: Sequence[float],
    ) -> None: ...
    def current(self, groups: Any) -> bool: ...
    @overload
    def step(
        self,
        grads: Sequence[Any],
        num_threads: int = ...,
        chunk: int = ...,
        isa: int = ...,
        grad_scale: float = ...,
        skip_nonfinite: bool = ...,
        max_grad_norm: float = ...,
        prefetch: int = ...,
        groups: None = ...,
    ) -> tuple[bool, float | None]: ...
    @overload
    def step(
        self,
        grads: Sequence[Any],
        num_threads: int = ...,
        chunk: int = ...,
        isa: int = ...,
        grad_scale: float = ...,
        skip_nonfinite: bool = ...,
        max_grad_norm: float = ...,
        prefetch: int = ...,
        groups: Any = ...,
    ) -> tuple[bool, float | None] | None: ...

def step_plans(
    plans: Sequence[_Plan],
    grads: Sequence[Sequence[Any]],
    num_threads: int = ...,
    grad_scale: float = ...,
    skip_nonfinite: bool = ...,
    max_grad_norm: float = ...,
) -> tuple[bool, float | None]: ...
def same_options(keys: list[Any], applied: Any) -> bool: ...
def grad_stats(
    grads: Sequence[Any],
    num_threads: int = ...,
    isa: int = ...,
    formats: Sequence[int] | None = ...,
) -> tuple[float, bool]: ...
def rule_consts(
    rule: int,
    lr: float,
    weight_decay: float,
    maximize: bool,
    ema_decay: float | None,
    hyper: Sequence[float],
    step: float,
    scalar: float = ...,
    grad_scale: float = ...,
) -> tuple[list[float], int]: ...
def scalar_after(
    rule: int, lr: float, weight_decay: float, hyper: Sequence[float], step: float, scalar: float
) -> float: ...
def traffic_f32(streams: Sequence[Any], num_threads: int = ...) -> None: ...
def traffic(arrays: Sequence[Any], num_threads: int = ...) -> None: ...
def rng_base(seed: int, index: int) -> int: ...
def stream_key(base: int, step: int, stream: int) -> int: ...
