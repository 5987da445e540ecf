"""fastadam: fused, bit-reproducible optimizers for the CPU.

    import fastadam
    opt = fastadam.Adam(params)          # params: list of float32/float64 NumPy arrays
    opt.step(grads)                      # one fused C pass over all of them

The family, each with torch.optim's signature, defaults and state names: Adam, AdamW,
SGD (momentum, Nesterov), Adagrad, RMSprop, Adamax, NAdam, RAdam, and Lion.

``fastadam.adam_step`` is the functional form, ``fastadam.reference`` the pure-NumPy
specification the C kernels reproduce bit for bit, ``fastadam.config()`` tells which SIMD
path and how many threads are in use. Set ``FASTADAM_SIMD`` (scalar, sse2, avx2, avx512,
neon or auto) before import to force a path.
"""

import os as _os
from typing import Any as _Any

from . import _core
from .functional import adam_step
from .optim import (
    SGD,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    InverseSqrtDecay,
    Lion,
    NAdam,
    RAdam,
    RMSprop,
    aligned_zeros,
    clip_grad_norm_,
)

__version__ = _core.VERSION
__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "InverseSqrtDecay",
    "Lion",
    "NAdam",
    "RAdam",
    "RMSprop",
    "__version__",
    "adam_step",
    "aligned_zeros",
    "clip_grad_norm_",
    "config",
    "reference",
]


def _available():
    return [
        n for i, n in enumerate(_core.ISA_NAMES) if _core.isa_compiled(i) and _core.isa_supported(i)
    ]


def _select_from_env():
    """Choose the SIMD path once, at import, from FASTADAM_SIMD (default: the best one)."""
    name = _os.environ.get("FASTADAM_SIMD", "auto").strip().lower() or "auto"
    if name == "auto":
        return _core.select_isa(-1)
    try:
        i = _core.isa_index(name)
    except ValueError as e:
        raise RuntimeError(f"FASTADAM_SIMD={name!r}: {e}") from None
    if not _core.isa_compiled(i):
        raise RuntimeError(
            f"FASTADAM_SIMD={name!r}: that path is not compiled into this build; "
            f"usable here: {', '.join(_available())}"
        )
    if not _core.isa_supported(i):
        raise RuntimeError(
            f"FASTADAM_SIMD={name!r}: this CPU (or OS) does not support it; "
            f"usable here: {', '.join(_available())}"
        )
    return _core.select_isa(i)


_select_from_env()


def config() -> dict[str, _Any]:
    """What this build and machine use: a dict with

    version, simd (the path in use), simd_available (compiled in and supported here, in
    order of preference), simd_compiled, openmp (bool: built with OpenMP; if False every
    step runs serially), max_threads (OpenMP's default team size), thread_cap (the most
    threads a step uses, whatever num_threads asks: 4 x the processors, at least
    max_threads), forked (True in a child made by os.fork(): every step then runs on the
    calling thread, as GNU OpenMP cannot run threads after a fork), default_chunk (the
    least elements per thread), prefetch_window ((lo, hi]: a step whose state bytes --
    elements x itemsize x 4, all tensors of the step together -- lie in it prefetches in
    software; (0, 0] means never: no L3 size was reported), rules (the update rules the C
    core runs).
    """
    return {
        "version": __version__,
        "simd": _core.ISA_NAMES[_core.current_isa()],
        "simd_available": _available(),
        "simd_compiled": [n for i, n in enumerate(_core.ISA_NAMES) if _core.isa_compiled(i)],
        "openmp": _core.openmp(),
        "max_threads": _core.max_threads(),
        "thread_cap": _core.thread_cap(),
        "forked": _core.forked(),
        "default_chunk": _core.DEFAULT_CHUNK,
        "prefetch_window": _core.prefetch_window(),
        "rules": list(_core.RULE_NAMES),
    }


from . import reference  # noqa: E402  (after the core is initialised)
