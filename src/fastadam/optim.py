"""The NumPy optimizers (Adam, AdamW, SGD, ... Lion): a thin class around one fused C call."""

from __future__ import annotations

import math
import numbers
import operator
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import (
    _core,
    _formats,
    _sync,  # after _core: see _sync's docstring
)
from ._options import (
    _real,
    changed,
    check_count,
    check_ema_decay,
    check_flag,
    check_grad_scale,
    check_max_norm,
    check_threads,
    clip_coefficient,
)
from ._rules import RULES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from numpy.typing import ArrayLike, DTypeLike, NDArray

    from ._rules import Rule

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "InverseSqrtDecay",
    "Lion",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "aligned_zeros",
    "clip_grad_norm_",
]

_ALIGN = 64


def aligned_zeros(
    shape: int | Sequence[int], dtype: DTypeLike = np.float32, align: int = _ALIGN
) -> NDArray[Any]:
    """A zero-filled C-contiguous array whose data starts on an `align`-byte boundary.

    shape: an int or a sequence of ints >= 0; align: an int in [1, 2**20]."""
    try:
        dtype = np.dtype(dtype)
    except Exception as e:  # numpy raises TypeError, ValueError or worse for garbage
        raise TypeError(f"dtype must be a NumPy dtype, got {dtype!r} ({e})") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise TypeError(f"dtype must be a fixed-size, non-object dtype, got {dtype}")
    if isinstance(align, (bool, np.bool_)) or not isinstance(align, numbers.Integral):
        raise TypeError(f"align must be an int, got {type(align).__name__}")
    if not 1 <= align <= 2**20:
        raise ValueError(f"align must be in [1, 2**20], got {align}")
    align = int(align)
    dims = (shape,) if isinstance(shape, numbers.Integral) else shape
    if isinstance(dims, (str, bytes, dict)) or not hasattr(dims, "__iter__"):
        raise TypeError(f"shape must be an int or a sequence of ints, got {type(shape).__name__}")
    try:
        dims = tuple(dims)
    except Exception as e:
        raise TypeError(f"shape must be an int or a sequence of ints ({e})") from None
    for d in dims:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
        if d < 0:
            raise ValueError(f"shape must not have negative dimensions, got {shape!r}")
    dims = tuple(int(d) for d in dims)
    if len(dims) > 64:
        raise ValueError(f"shape has {len(dims)} dimensions, NumPy allows at most 64")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > 2**62:
        raise ValueError(f"shape {dims} of {dtype} is too large ({nbytes} bytes)")
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(dims)


def _staggered_zeros(shape, dtype, page_offset):
    """Zeros of this shape and dtype, 64-byte aligned, starting at `page_offset` (mod 4096,
    rounded up to 64) within a page when the buffer is large enough for it to matter."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < (1 << 16):
        return aligned_zeros(shape, dtype)
    want = -(-page_offset // _ALIGN) * _ALIGN % 4096
    raw = np.zeros(nbytes + 4096, dtype=np.uint8)
    offset = (want - raw.ctypes.data) % 4096
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def _bfloat16(params=()):
    """NumPy's bfloat16 dtype: that of a bfloat16 parameter when there is one, else
    ml_dtypes' (imported only here: fastadam itself never needs it)."""
    for p in params:
        dt = getattr(p, "dtype", None) if isinstance(p, np.ndarray) else None
        if dt is not None and dt.name == "bfloat16" and dt.isnative:
            return dt
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(
            "state_dtype=bfloat16 needs the ml_dtypes package (pip install ml_dtypes)"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _constant_state(value, n, fmt):
    """(codes fill, absmax fill) of an n-element 8-bit stream that holds `value`
    everywhere: every block of a constant is quantized alike, so one block says it."""
    from .reference import formats as ref

    x = np.full(min(n, _formats.Q8_BLOCK), value, np.float32)
    codes, absmax = ref.quantize_blockwise(x, fmt == _formats.FMT_Q8_SIGNED)
    return codes.reshape(-1)[0], np.asarray(absmax, np.float32).reshape(-1)[0]


class InverseSqrtDecay:
    """The paper's decaying step size alpha_t = alpha / sqrt(t) (Kingma & Ba, section 4).

    Pass it as ``lr``: ``Adam(params, lr=InverseSqrtDecay(1e-3))``.
    """

    def __init__(self, alpha: float = 1e-3) -> None:
        self.alpha = float(alpha)

    def __call__(self, t: int) -> float:
        return self.alpha / math.sqrt(t)

    def __repr__(self) -> str:
        return f"InverseSqrtDecay(alpha={self.alpha!r})"


class Optimizer:
    r"""The NumPy optimizers' shared engine: param groups, state, one fused C call per step.

    Subclasses name their update rule (``_rule``, see fastadam._rules) and give the
    constructor torch.optim's signature; everything below is the same for every rule.

    Common parameters (after the rule's own hyperparameters)
    ----------------------------------------------------------
    params : list of arrays, or list of dicts ``{"params": [...], "lr": ..., ...}`` (param
        groups with per-group options, as torch). Arrays must be writable, C-contiguous,
        aligned and distinct, and either all float64 or each float32, float16 or bfloat16
        (``ml_dtypes.bfloat16``), computed in float32 (docs/formats.md).
    lr : float >= 0 or a callable ``lr(t) -> float`` of the 1-based step number (see
        :class:`InverseSqrtDecay`).
    ema_decay : None, or d in [0, 1): also keep the temporal average of every parameter
        (Kingma & Ba, Sec. 7.2), ``param_ema <- d*param_ema + (1-d)*param`` from 0,
        updated in the same pass (one more stream); :meth:`averaged_params` returns the
        bias-corrected average ``param_ema / (1 - d**t)``. It never changes the
        optimizer's own trajectory. A group option, like the others.
    num_threads : OpenMP threads for every step (None: OpenMP's default; else 1 to
        2**31 - 1, and never more than ``fastadam.config()['thread_cap']`` are used).
    max_grad_norm : if set, clip the global L2 norm of all gradients to it, as
        ``torch.nn.utils.clip_grad_norm_`` followed by the step would, but fused: one read
        pass computes the norm (deterministically) and the clip coefficient is folded into
        the update pass; gradients are not rewritten.
    skip_nonfinite : if True, a step whose gradients hold an inf or NaN changes nothing
        (parameters, state, step counts) and ``step`` returns False.

    Storage formats (optimizer-wide, keyword-only; docs/formats.md is the contract)
    ---------------------------------------------------------------------------------
    A float16/bfloat16 parameter is computed in float32: each step widens it and its state
    exactly, runs the float32 rule and rounds what it stores. Its gradient may have its
    dtype or be float32.

    master_weights : bool (default False). Keep a float32 copy of every 16-bit parameter,
        ``state[i]["master_param"]`` (the "master weights" of mixed-precision training,
        Micikevicius et al. 2018): the rule updates the master and, in the same pass,
        stores the 16-bit parameter as its rounded image. The master (and float32 state)
        follows bit for bit the float32 trajectory of the same rule fed the widened
        gradients. The master is the parameter widened to float32 as of its first step (a
        value written to the parameter before then is kept); afterwards change the weights
        through ``master_param``: the 16-bit parameter is overwritten at every step.
        float32/float64 parameters are their own master; ValueError if no parameter is
        16-bit.
    state_dtype : None, float32, bfloat16 or ``"8bit"`` (NumPy or torch dtypes, or their
        names): the storage of the rule's state (the moments). None: the parameter's dtype
        (a 16-bit parameter's own dtype, as torch; float32 with master weights).
        ``"8bit"``: bitsandbytes' blockwise format (Dettmers et al. 2022): per element the
        uint8 index of the nearest value of a 256-entry dynamic map (signed for first
        moments, unsigned for states that are never negative), per block of 256 elements
        a float32 absmax (``<name>_absmax``); tensors of fewer than 4096 elements keep
        float32 state. Each step updates the parameter from the float32 moments it just
        computed; only their stored image is rounded or quantized. float64 parameters
        take None only (TypeError naming the parameter).
    rounding : ``"nearest"`` (IEEE round-to-nearest-even, default) or ``"stochastic"``:
        how every 16-bit value stored (a 16-bit parameter, bfloat16/float16 state) is
        rounded. Stochastic rounding rounds up with probability proportional to the
        distance from the lower neighbour, so small updates survive in expectation; its
        random bits hash (seed, parameter index, step, stream, element index): the same on
        every SIMD path and thread count and after a state_dict resume.
    seed : int in [0, 2**64) (default 0)
        the key of stochastic rounding.

    The state buffers are allocated once, 64-byte aligned; ``step`` allocates nothing.
    ``state_dict()`` mirrors torch's layout for the rule (per-parameter state under
    torch's names, ``step`` where torch keeps one, and ``param_groups``), with copies of
    the arrays; with ``ema_decay`` each entry also holds ``param_ema`` and
    ``param_ema_step`` (its update count); ``master_param`` and ``<name>_absmax`` where
    the formats keep them, ``step`` for every rule under stochastic rounding (its random
    bits are keyed on the step count), and ``state_dict()["formats"]`` the four format
    options (a state_dict saved with other formats is refused).

    Like torch.optim, every step re-reads ``param_groups``: a parameter array put into a
    group (or a group's list changed) is picked up, and a new array starts with fresh
    state (state belongs to the array object, as in torch). A parameter or state array
    whose data pointer, dtype, byte order, shape or flags changed since the last step
    (``p.resize(...)``, ``p.dtype = ...``, ``p.flags.writeable = False``, ...) is noticed:
    a new shape with the same number of elements is followed (the state is reshaped with
    it), anything else is refused with a ValueError naming the parameter, before any
    buffer is written. The check costs a few nanoseconds per array.

    Threads: every public method of one optimizer holds its lock, so two threads
    stepping one optimizer take turns; and the C passes of all optimizers (and of
    :func:`adam_step`) in the process run one at a time (each already uses every core),
    so two optimizers that share an array never interleave their updates either. A step
    keeps a reference to every gradient until it returns: emptying the ``grads`` list
    from another thread meanwhile is harmless. Not safe: changing an array's memory
    under a running step (``ndarray.resize(refcheck=False)``), which NumPy itself
    documents as unsafe. After ``os.fork()`` the child steps on one thread (GNU OpenMP
    cannot run threads in a forked child); use the 'spawn' or 'forkserver' start method
    for multithreaded children.

    An exception (KeyboardInterrupt included) raised around a step leaves the step
    counts (``state_dict()['step_count']`` and each parameter's counts) consistent with
    the buffers: they are committed together, inside the C call.
    """

    _rule: ClassVar[Rule] = None  # type: ignore[assignment]  # each subclass sets its Rule

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        *,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        self._lock = _sync.new_lock(self)
        self._formats = _formats.check_formats(master_weights, state_dtype, rounding, seed)
        # state_dict entries hold 'step' where torch keeps one, and for every rule under
        # stochastic rounding (its random bits are keyed on each parameter's step count)
        self._counted = self._rule.step or self._formats.stochastic
        self._bf16 = None  # NumPy's bfloat16 dtype, once some buffer needs it
        rule = self._rule
        self._group_keys = tuple(rule.defaults) + ("ema_decay",)
        self._group_key = operator.itemgetter(*self._group_keys)  # one C call per group
        if "betas" in defaults and _is_pair(defaults["betas"]):
            defaults["betas"] = tuple(defaults["betas"])
        self.defaults = defaults
        self._check_group(self.defaults, "defaults")
        self.num_threads = num_threads
        self.max_grad_norm = check_max_norm(max_grad_norm)
        self.skip_nonfinite = check_flag("skip_nonfinite", skip_nonfinite)
        if isinstance(params, (np.ndarray, dict)) or not hasattr(params, "__iter__"):
            raise TypeError(
                "params must be a list of arrays or of param-group dicts, "
                f"got {type(params).__name__}"
            )
        params = list(params)
        if not params:
            raise ValueError("params is an empty list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        self._params: list[Any] = []  # the parameters the plan was built from, in group order
        self._states: list[dict[str, Any]] = []  # their state dicts (streams, param_ema, scalar)
        self._group_of: list[int] = []
        # tests force a SIMD path, a split and prefetching on/off through these
        self._isa, self._chunk, self._prefetch = -1, 0, -1
        # built by the first _add_group below (params is not empty), never None after
        self._plan: _core._Plan = None  # type: ignore[assignment]
        self._applied = None
        for group in groups:
            self._add_group(group)
        self._rebuild()

    @property
    def num_threads(self) -> int | None:
        """OpenMP threads per step (None: OpenMP's default); may be changed between steps."""
        return self._num_threads or None

    @num_threads.setter
    def num_threads(self, value: Any) -> None:
        self._num_threads = check_threads(value)

    @property
    def skip_nonfinite(self) -> bool:
        """Skip (change nothing, return False) a step whose gradients hold an inf or NaN."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value: Any) -> None:
        self._skip_nonfinite = check_flag("skip_nonfinite", value)

    @property
    def max_grad_norm(self) -> float | None:
        """Clip the global gradient norm to this (None: no clipping); may be changed."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: Any) -> None:
        self._max_grad_norm = check_max_norm(value)

    @property
    def master_weights(self) -> bool:
        """Whether 16-bit parameters keep a float32 master_param (fixed at construction)."""
        return self._formats.master_weights

    @property
    def state_dtype(self) -> str | None:
        """The state storage: None, 'float32', 'float64', 'bfloat16' or '8bit' (fixed)."""
        return self._formats.state_dtype

    @property
    def rounding(self) -> str:
        """'nearest' or 'stochastic': how stored 16-bit values are rounded (fixed)."""
        return self._formats.rounding

    @property
    def seed(self) -> int:
        """The key of stochastic rounding (fixed at construction)."""
        return self._formats.seed

    @property
    def last_grad_norm(self) -> float | None:
        """The unscaled global gradient norm of the last step, before clipping, when it
        was computed (max_grad_norm or skip_nonfinite), else None."""
        return self._plan.last_grad_norm

    @property
    def _step_count(self):
        return self._plan.step_count

    # ------------------------------------------------------------------ groups
    def _check_group(self, group, where):
        """The group's options, checked: (the rule's normalised options, ema_decay)."""
        lr = group["lr"]
        o = self._rule.check(dict(group, lr=1.0 if callable(lr) else lr))
        return o, check_ema_decay(group.get("ema_decay"))

    def _add_group(self, group):
        """Check a group and append it to param_groups (its state is made by _rebuild)."""
        if not isinstance(group, dict):
            raise TypeError(f"param groups must be dicts, got {type(group).__name__}")
        unknown = [k for k in group if k not in self._group_keys and k != "params"]
        if unknown:
            raise ValueError(f"unknown param-group options: {sorted(map(str, unknown))}")
        if "params" not in group:
            raise ValueError("a param group must have a 'params' entry")
        params = group["params"]
        if isinstance(params, (str, bytes, dict)) or not (
            isinstance(params, np.ndarray) or hasattr(params, "__iter__")
        ):
            raise TypeError(
                f"a param group's 'params' must be an array or a list of arrays, "
                f"got {type(params).__name__}"
            )
        params = [params] if isinstance(params, np.ndarray) else list(params)
        if not params:
            raise ValueError("a param group has an empty 'params' list")
        gi = len(self.param_groups)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(
                    f"duplicate parameters: an array appears twice (param group {gi}, index {i})"
                )
            seen.add(id(p))
            _as_param(p, f"param group {gi}, params[{i}]")
        new = {k: group.get(k, self.defaults[k]) for k in self._group_keys}
        if "betas" in new and _is_pair(new["betas"]):
            new["betas"] = tuple(new["betas"])
        self._check_group(new, f"param group {gi}")
        new["params"] = params
        self.param_groups.append(new)

    def _np_dtype(self, name):
        """The NumPy dtype of a dtype name of _formats (bfloat16: see _bfloat16)."""
        if name != "bfloat16":
            return np.dtype(name)
        if self._bf16 is None:
            self._bf16 = _bfloat16(p for g in self.param_groups for p in g["params"])
        return self._bf16

    def _streams_for(self, a, o, ema, pf, s=None):
        """s (a parameter's state dict, or a new one) completed with every stream the
        options need, each starting at the rule's initial value stored in its format
        (pf, a _formats.ParamFormat): 8-bit codes with their ``<name>_absmax``, and the
        ``master_param`` (the parameter widened to float32). Buffers start 1, 2, 3 KiB
        (the master: 512 bytes) past the parameter's offset within a 4 KiB page: buffers
        at the same page offset make the CPU suspect that a load depends on an earlier
        store to another buffer ("4K aliasing"), which costs a third of the in-cache
        speed."""
        rule = self._rule
        s = {} if s is None else dict(s)
        page = a.ctypes.data % 4096
        want = rule.needs(o) + (("param_ema",) if ema is not None else ())
        fmts = pf.states + (_formats.FMT_NATIVE,)
        for j, (k, fmt) in enumerate(zip(rule.state + ("param_ema",), fmts)):
            if k in want and k not in s:
                dtype = self._np_dtype(_formats.fmt_dtype(fmt, pf.compute))
                s[k] = _staggered_zeros(a.shape, dtype, page + 1024 * (j % 3 + 1))
                init = rule.initial(k, o) if k != "param_ema" else 0.0
                if _formats.is_q8(fmt):
                    s[k + "_absmax"] = aligned_zeros(-(-a.size // _formats.Q8_BLOCK), np.float32)
                    code, absmax = _constant_state(init, a.size, fmt)
                    s[k][...] = code
                    s[k + "_absmax"][...] = absmax
                elif init != 0.0:
                    s[k][...] = init
        if pf.master and "master_param" not in s:
            s["master_param"] = _staggered_zeros(a.shape, np.dtype(np.float32), page + 512)
            s["master_param"][...] = a
        if rule.scalar is not None and rule.scalar[0] not in s:
            s[rule.scalar[0]] = np.array(rule.scalar[1], np.float64)
        return s

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (a dict with 'params' and options; missing options take the defaults)."""
        with self._lock:
            n = len(self.param_groups)
            self._add_group(param_group)
            try:
                self._rebuild()
            except BaseException:
                del self.param_groups[n:]
                raise

    def _rebuild(self, states=None, steps=None):
        """Build the plan from param_groups as they are now, keeping the state of every
        parameter the old plan had (by identity, as torch keys state by tensor) and
        making fresh state for new ones. All or nothing: on error nothing changes.

        states/steps: load_state_dict's new state and (step, ema count) pairs, one per
        parameter in group order."""
        rule = self._rule
        fm = self._formats
        old = self._plan
        known: dict[int, Any] = {}
        s: Any
        c: Any
        if old is not None:
            for p, s, c, e, dt in zip(
                self._params, self._states, old.get_steps(), old.get_ema_steps(), self._dtypes
            ):
                known[id(p)] = (s, (c, e), dt)
        params: list[Any] = []
        new_states: list[dict[str, Any]] = []
        counts: list[tuple[Any, Any]] = []
        group_of: list[int] = []
        pfs: list[Any] = []
        dtypes: list[Any] = []
        compute = None  # (the compute dtype, the first parameter's label)
        seen = set()
        for gi, g in enumerate(self.param_groups):
            if not isinstance(g, dict) or not isinstance(g.get("params"), list):
                raise TypeError(
                    f"param_groups[{gi}] must be a dict whose 'params' is a list of arrays"
                )
            try:
                o, ema = self._check_group(g, f"param group {gi}")
            except KeyError:
                raise ValueError(
                    "every param group must be a dict with every option "
                    f"({', '.join(self._group_keys)}); add groups with "
                    f"add_param_group"
                ) from None
            for j, p in enumerate(g["params"]):
                where = f"param group {gi}, params[{j}]"
                a = _as_param(p, where)
                if id(p) in seen:
                    raise ValueError(f"duplicate parameters: an array appears twice ({where})")
                seen.add(id(p))
                pf = _formats.param_format(rule, a.dtype.name, a.size, fm, where)
                if compute is None:
                    compute = (pf.compute, where)
                elif pf.compute != compute[0]:
                    raise TypeError(
                        f"{where} is {a.dtype} but {compute[1]} is not (or the reverse): "
                        f"float64 parameters cannot share an optimizer with float32, "
                        f"float16 or bfloat16 ones (they are computed in float32); use "
                        f"one optimizer for each"
                    )
                if states is not None:
                    s, c = states[len(params)], steps[len(params)]
                elif id(p) in known:
                    s, c, dt = known[id(p)]
                    layout = _formats.state_layout(rule, pf, a.shape, names=s, ema=True)
                    for k, v in s.items():
                        if v.ndim == 0:
                            continue  # the rule's scalar
                        want = layout.get(k, (None,))[0]
                        if (
                            dt != a.dtype
                            or v.dtype.name != want
                            or v.size != math.prod(layout[k][1])
                        ):
                            raise ValueError(
                                f"{where} is {_what(a)}, but its state {k!r} is {_what(v)}"
                                f"{'' if dt == a.dtype else f' (made for {dt})'}: a "
                                f"parameter and its state are updated in place and may not "
                                f"change their size or dtype (put a new array in the param "
                                f"group instead: it starts with fresh state)"
                            )
                    if any(
                        v.ndim and v.shape != a.shape and not k.endswith("_absmax")
                        for k, v in s.items()
                    ):
                        # same elements, new shape: follow it
                        s = {
                            k: v.reshape(a.shape) if v.ndim and not k.endswith("_absmax") else v
                            for k, v in s.items()
                        }
                else:
                    s, c = None, (0, 0)
                full = self._streams_for(a, o, ema, pf, s)
                if s is not None and not rule.step and any(k not in s for k in rule.needs(o)):
                    # torch starts a new buffer from the gradient (SGD: buf = g), which the
                    # kernel does at the count's first step
                    c = (0, c[1])
                params.append(p)
                new_states.append(full)
                counts.append(c)
                group_of.append(gi)
                pfs.append(pf)
                dtypes.append(a.dtype)
        _formats.check_master_needed(fm, [d.name for d in dtypes])
        scalar = rule.scalar[0] if rule.scalar else None
        kw: dict[str, Any] = {}
        if not all(pf.native for pf in pfs):
            # (all native: every buffer float32, or every one float64, the plan of old)
            kw = dict(
                formats=[pf.plan_tuple() for pf in pfs],
                masters=[s.get("master_param") for s in new_states],
                absmaxes=[tuple(s.get(k + "_absmax") for k in rule.state) for s in new_states],
                stochastic=fm.stochastic,
                seed=fm.seed,
                indices=list(range(len(pfs))),
            )
        plan = _core._Plan(
            rule.index,
            rule.state,
            params,
            [tuple(s.get(k) for k in rule.state) for s in new_states],
            [s.get("param_ema") for s in new_states],
            group_of,
            max(len(self.param_groups), 1),
            scalar_mirrors=[s[scalar] for s in new_states] if scalar else None,
            **kw,
        )
        for i, (c, e) in enumerate(counts):
            plan.set_step(i, c, e)
        if old is not None:
            plan.step_count = old.step_count
            plan.last_grad_norm = old.last_grad_norm
        self._params, self._states, self._group_of, self._plan = (
            params,
            new_states,
            group_of,
            plan,
        )
        self._dtypes: list[Any] = dtypes
        # masters of parameters that have not stepped yet are refreshed before each step
        self._unsynced = [i for i, pf in enumerate(pfs) if pf.master and counts[i][0] == 0]
        self._ngroups = len(self.param_groups)
        self._applied = None

    def _sync_masters(self):
        """Before its first step, a parameter's master is the parameter widened (as torch
        makes state at the first step): what was written to the parameter since the
        optimizer was made is kept. Masters of parameters that have stepped are left
        alone."""
        steps = self._plan.get_steps()
        left = []
        for i in self._unsynced:
            if steps[i] == 0:
                a = np.asarray(self._params[i])
                m = self._states[i]["master_param"]
                if a.dtype == self._dtypes[i] and a.shape == m.shape:  # else: rebuilt first
                    m[...] = a
                left.append(i)
        self._unsynced = left

    # -------------------------------------------------------------------- step
    def step(self, grads: Sequence[ArrayLike | None], grad_scale: float = 1.0) -> bool:
        """Update every parameter in place from ``grads`` (one array, or None to skip, per
        parameter, in the order of the param groups) with one call into C.

        ``grad_scale``: the gradients are divided by it inside the pass (loss scaling).
        Returns True if the step was taken, False if ``skip_nonfinite`` skipped it. When
        the global gradient norm was computed (clipping or skip_nonfinite) it is left in
        ``self.last_grad_norm`` (unscaled, before clipping)."""
        with self._lock:
            plan = self._plan
            try:
                keys = [self._group_key(g) for g in self.param_groups]
            except (KeyError, TypeError):
                raise ValueError(
                    "every param group must be a dict with every option "
                    f"({', '.join(self._group_keys)}); add groups with "
                    f"add_param_group"
                ) from None
            for i, k in enumerate(keys):
                if callable(k[0]):  # an lr schedule: evaluate it for this step
                    keys[i] = (k[0](plan.step_count + 1),) + k[1:]
            if grad_scale.__class__ is not float or grad_scale != 1.0:
                grad_scale = check_grad_scale(grad_scale)
            if changed(keys, self._applied):
                self._apply(keys)
            if self._unsynced:
                self._sync_masters()
            r = self._plan.step(
                grads,
                self._num_threads,
                self._chunk,
                self._isa,
                grad_scale,
                self._skip_nonfinite,
                self._max_grad_norm or 0.0,
                self._prefetch,
                self.param_groups,
            )
            if r is None:
                # The parameters (or a state array) changed since the plan was built:
                # rebuild (or refuse), as torch.optim re-reads its param_groups.
                for _attempt in range(3):
                    self._rebuild()
                    self._apply(keys)
                    if self._unsynced:
                        self._sync_masters()
                    r = self._plan.step(
                        grads,
                        self._num_threads,
                        self._chunk,
                        self._isa,
                        grad_scale,
                        self.skip_nonfinite,
                        self.max_grad_norm or 0.0,
                        self._prefetch,
                        self.param_groups,
                    )
                    if r is not None:
                        break
                else:
                    raise RuntimeError(
                        "fastadam: the parameters kept changing while a step "
                        "was being prepared (another thread?)"
                    )
            return r[0]

    def _apply(self, keys):
        """Check every group's options, then hand them to the plan (all or nothing)."""
        rule = self._rule
        options = [
            self._check_group(dict(zip(self._group_keys, k)), f"param group {gi}")
            for gi, k in enumerate(keys)
        ]
        if len(options) != self._ngroups or any(
            any(k not in s for k in rule.needs(options[gi][0]))
            or (options[gi][1] is not None and "param_ema" not in s)
            for s, gi in zip(self._states, self._group_of)
        ):
            # groups added, or options that need a new stream (amsgrad switched on, say):
            # allocate it (at the rule's initial value)
            self._rebuild()
        for gi, (o, ema) in enumerate(options):
            self._plan.set_options(
                gi, o["lr"], o["weight_decay"], o["maximize"], ema, rule.c_hyper(o)
            )
        self._applied = keys

    # ------------------------------------------------------------------- state
    @property
    def state(self) -> list[dict[str, Any]]:
        """Per-parameter state, in parameter order (live arrays; counts are snapshots)."""
        with self._lock:
            return [self._entry(i, copy=False) for i in range(len(self._states))]

    def _entry(self, i, copy):
        rule = self._rule
        s = self._states[i]
        entry = {}
        if self._counted:
            entry["step"] = self._plan.get_steps()[i]
        for k in rule.state:
            if k in s:
                entry[k] = s[k].copy() if copy else s[k]
                if k + "_absmax" in s:
                    entry[k + "_absmax"] = s[k + "_absmax"].copy() if copy else s[k + "_absmax"]
        if "master_param" in s:
            entry["master_param"] = s["master_param"].copy() if copy else s["master_param"]
        if rule.scalar:
            entry[rule.scalar[0]] = float(s[rule.scalar[0]])
        if "param_ema" in s:
            entry["param_ema"] = s["param_ema"].copy() if copy else s["param_ema"]
            entry["param_ema_step"] = self._plan.get_ema_steps()[i]
        return entry

    def averaged_params(self) -> list[NDArray[Any]]:
        """The temporal averages of the parameters (Kingma & Ba, Sec. 7.2), for
        evaluation: new arrays ``param_ema / (1 - d**t)``, d the group's ``ema_decay``
        and t the number of averaged steps, in the order of the param groups (a copy of
        the parameter where nothing has been averaged yet). Raises ValueError unless
        ``ema_decay`` is set for every group.

        The average of a float16/bfloat16 parameter is kept in float32 and returned in
        float32 (where nothing has been averaged yet: its master_param, or the parameter
        widened)."""
        with self._lock:
            out = []
            counts = self._plan.get_ema_steps()
            for i, (p, s) in enumerate(zip(self._params, self._states)):
                d = self.param_groups[self._group_of[i]].get("ema_decay")
                if d is None or "param_ema" not in s:
                    raise ValueError(
                        f"param group {self._group_of[i]} has no ema_decay: "
                        f"set ema_decay (in [0, 1)) to keep temporal averages"
                    )
                a = np.asarray(p)
                t = counts[i]
                if t == 0:
                    out.append(
                        s["master_param"].copy()
                        if "master_param" in s
                        else a.astype(s["param_ema"].dtype)
                    )
                    continue
                ema_arr = s["param_ema"]
                correction = 1.0 - float(d) ** t
                out.append((ema_arr / ema_arr.dtype.type(correction)).astype(ema_arr.dtype))
            return out

    def state_dict(self) -> dict[str, Any]:
        """torch-style: {'state': {index: {...}}, 'param_groups': [{..., 'params': [...]}],
        'step_count': steps taken}.

        Arrays are copies. Parameters that never took a step have no entry, as in torch.
        """
        with self._lock:
            steps = self._plan.get_steps()
            state = {}
            for i in range(len(self._states)):
                if steps[i] > 0:
                    entry = self._entry(i, copy=True)
                    if entry:
                        state[i] = entry
            groups, i = [], 0
            for g in self.param_groups:
                d = {k: g[k] for k in self._group_keys}
                d["params"] = list(range(i, i + len(g["params"])))
                i += len(g["params"])
                groups.append(d)
            return {
                "state": state,
                "param_groups": groups,
                "step_count": self._plan.step_count,
                "formats": self._formats.as_dict(),
            }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict() of an optimizer over parameters of the same shapes and dtype.

        Everything is checked first -- the layout (no missing or unknown keys), every
        group's options, the formats (``state_dict["formats"]`` must equal this
        optimizer's; a state_dict without one was saved with the defaults), every step
        count (an integer, 0 <= step < 2**62), every array's shape and dtype (each state
        in its format) -- and an error names the entry; on error this optimizer is
        unchanged. As in torch, the saved groups' 'params' ids are matched to this
        optimizer's parameters in order, and 'state' is keyed by those ids.
        """
        with self._lock:
            groups, states, steps, step_count = self._parse_state_dict(state_dict)
            old_groups = self.param_groups
            self.param_groups = groups
            try:
                self._rebuild(states, steps)
            except BaseException:
                self.param_groups = old_groups
                raise
            self._plan.step_count = step_count

    def _parse_state_dict(self, state_dict):
        """The new param_groups, states and step counts of a state dict (nothing is
        changed here)."""
        rule = self._rule
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing the key {key!r}")
        unknown = [
            k for k in state_dict if k not in ("state", "param_groups", "step_count", "formats")
        ]
        if unknown:
            raise ValueError(f"state_dict has unknown keys {_keys(unknown)}")
        self._check_saved_formats(state_dict.get("formats"))
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(
                f"state_dict['param_groups'] must be a list, got {type(saved_groups).__name__}"
            )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer "
                f"has {len(self.param_groups)}"
            )
        new_groups: list[dict[str, Any]] = []
        id_of: dict[int, int] = {}
        checked = []
        optional = ("ema_decay",)  # absent from torch.optim's groups
        for gi, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, dict):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            missing = [
                k for k in self._group_keys + ("params",) if k not in saved and k not in optional
            ]
            if missing:
                raise ValueError(f"{where} is missing {missing}")
            unknown = [k for k in saved if k not in self._group_keys and k != "params"]
            if unknown:
                raise ValueError(f"{where} has unknown keys {_keys(unknown)}")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)):
                raise TypeError(
                    f"{where}['params'] must be a list of parameter ids, got {type(ids).__name__}"
                )
            if len(ids) != len(mine["params"]):
                raise ValueError(
                    f"param group {gi} has {len(mine['params'])} parameters, the "
                    f"state_dict's has {len(ids)}"
                )
            for j, k in enumerate(ids):
                if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
                    raise TypeError(f"{where}['params'][{j}] must be an int id, got {k!r}")
                if int(k) in id_of:
                    raise ValueError(f"{where}['params'][{j}]: the id {int(k)} appears twice")
                id_of[int(k)] = len(id_of)
            g: dict[str, Any] = {k: saved.get(k) for k in self._group_keys}
            if "betas" in g and _is_pair(g["betas"]):
                g["betas"] = tuple(g["betas"])
            checked.append(self._check_group(g, where))
            g["params"] = mine["params"]
            new_groups.append(g)
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got {type(saved_state).__name__}")
        extra = [
            k
            for k in saved_state
            if isinstance(k, (bool, np.bool_))
            or not isinstance(k, (int, np.integer))
            or int(k) not in id_of
        ]
        if extra:
            raise ValueError(
                f"state_dict['state'] has entries for unknown parameters {_keys(extra)}"
            )
        entries = {id_of[int(k)]: (k, v) for k, v in saved_state.items()}
        new_states: list[dict[str, Any]] = []
        steps: list[tuple[Any, Any]] = []
        for g, (o, ema) in zip(new_groups, checked):
            for p in g["params"]:
                pos = len(new_states)
                a = _as_param(p, f"parameter {pos}")
                pf = _formats.param_format(
                    rule, a.dtype.name, a.size, self._formats, f"parameter {pos}"
                )
                layout = _formats.state_layout(rule, pf, a.shape, ema=True)
                known = (
                    set(layout)
                    | {"param_ema_step"}
                    | ({"step"} if self._counted else set())
                    | ({rule.scalar[0]} if rule.scalar else set())
                )
                s = {}
                step = ema_step = 0
                if pos in entries:
                    key, entry = entries[pos]
                    where = f"state_dict['state'][{key!r}]"
                    if not isinstance(entry, dict):
                        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
                    need = (["step"] if self._counted else []) + list(
                        _formats.state_layout(rule, pf, a.shape, names=rule.needs(o))
                    )
                    if rule.scalar:
                        need.append(rule.scalar[0])
                    missing = [k for k in need if k not in entry]
                    if missing:
                        raise ValueError(f"{where} is missing {missing}")
                    unknown = [k for k in entry if k not in known]
                    if unknown:
                        raise ValueError(f"{where} has unknown keys {_keys(unknown)}")
                    if self._counted:
                        step = check_count(f"{where}['step']", entry["step"])
                    elif any(k in entry for k in rule.needs(o)) or not rule.needs(o):
                        step = 1  # the buffers exist: not a first step (SGD)
                    if "param_ema" in entry:
                        ema_step = check_count(
                            f"{where}['param_ema_step']", entry.get("param_ema_step", 0)
                        )
                    for k, (dname, shape) in layout.items():
                        if k not in entry:
                            continue
                        if k.endswith("_absmax") and k[:-7] not in entry:
                            raise ValueError(f"{where} has {k!r} without {k[:-7]!r}")
                        v = _as_saved_array(entry[k], f"{where}[{k!r}]")
                        want = self._np_dtype(dname)
                        if v.shape != shape or v.dtype != want:
                            raise ValueError(
                                f"{where}[{k!r}] must have shape {shape} and dtype "
                                f"{want}; got {v.shape} {v.dtype}"
                            )
                        s[k] = v
                    for k in rule.state:
                        if k in s and k + "_absmax" in layout and k + "_absmax" not in s:
                            raise ValueError(f"{where} is missing {[k + '_absmax']}")
                    if rule.scalar:
                        k = rule.scalar[0]
                        v = _real(f"{where}[{k!r}]", _item(entry[k]))
                        if not 0.0 <= v <= 1.0:
                            raise ValueError(f"{where}[{k!r}] must be in [0, 1], got {v}")
                        s[k] = np.array(v, np.float64)
                full = self._streams_for(a, o, ema, pf)
                for k, v in s.items():
                    if v.ndim == 0 and k not in layout:
                        full[k] = v  # the rule's scalar
                        continue
                    if k not in full:  # saved, not needed now (amsgrad off, say): kept
                        full[k] = _staggered_zeros(v.shape, v.dtype, a.ctypes.data % 4096 + 3072)
                    full[k][...] = v
                new_states.append(full)
                steps.append((step, ema_step))
        if "step_count" in state_dict:
            step_count = check_count("state_dict['step_count']", state_dict["step_count"])
        else:
            step_count = max((s for s, _ in steps), default=0)
        return new_groups, new_states, steps, step_count

    def _check_saved_formats(self, saved):
        """A state_dict's 'formats' (None: saved without one, so with the defaults) must
        be this optimizer's: the state's layout and the rounding's bits follow them."""
        where = "state_dict['formats']"
        if saved is None:
            got = _formats.Formats()
        else:
            if not isinstance(saved, dict):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            names = ("master_weights", "state_dtype", "rounding", "seed")
            unknown = [k for k in saved if k not in names]
            if unknown:
                raise ValueError(f"{where} has unknown keys {_keys(unknown)}")
            try:
                got = _formats.check_formats(**{k: saved[k] for k in names if k in saved})
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
        if got != self._formats:
            diff = [
                f"{k}={getattr(got, k)!r} (this optimizer: {getattr(self._formats, k)!r})"
                for k in got._fields
                if getattr(got, k) != getattr(self._formats, k)
            ]
            raise ValueError(
                f"{where} differs from this optimizer's formats: "
                f"{', '.join(diff)}; make the optimizer with the same "
                f"master_weights, state_dtype, rounding and seed"
            )

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {g.get(k)}" for k in self._group_keys]
        return "\n".join(lines + [")"])


def _item(v):
    """A number, or a one-element array (or tensor), as a Python scalar (scalar state)."""
    if hasattr(v, "item") and not isinstance(v, (int, float)):
        try:
            return v.item()
        except Exception:
            return v
    return v


def _as_param(p, where):
    """p as an ndarray (a view, not a copy) if it can be a parameter, else TypeError."""
    try:
        a = np.asarray(p)
    except Exception as e:  # an object whose __array__ or buffer raises
        raise TypeError(
            f"{where} must be a float32 or float64 array (or float16 or "
            f"bfloat16), got {type(p).__name__} ({type(e).__name__}: {e})"
        ) from None
    if a.dtype not in (np.float32, np.float64, np.float16) and not (
        a.dtype.name == "bfloat16" and a.dtype.isnative
    ):
        raise TypeError(
            f"{where}: params must have dtype float32 or float64 (or float16 or "
            f"bfloat16, native byte order), got {type(p).__name__} of dtype "
            f"{a.dtype}"
        )
    return a


def _as_saved_array(v, where):
    try:
        return np.asarray(v)
    except Exception as e:
        raise TypeError(
            f"{where} must be an array, got {type(v).__name__} ({type(e).__name__}: {e})"
        ) from None


def _what(a):
    return f"a {a.shape} {a.dtype} array"


def _keys(keys):
    return sorted(map(repr, keys))


_COMMON = ("num_threads", "max_grad_norm", "skip_nonfinite")


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) for NumPy arrays, updated in place by one C call per step.

    For each parameter p with gradient g at step t (alpha = ``lr``, beta1, beta2 =
    ``betas``, epsilon = ``eps``, lambda = ``weight_decay``)::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g**2
        p <- p - alpha * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + epsilon)

    ``weight_decay`` adds lambda * p to g (L2, as torch.optim.Adam), or with
    ``decoupled_weight_decay=True`` first scales p by 1 - alpha*lambda (AdamW).
    ``amsgrad`` keeps the running maximum of v and uses it in the denominator;
    ``maximize`` ascends; ``bias_correction=False`` drops the 1 - beta**t factors;
    ``eps_mode="hat"`` selects the paper's "efficient version"; ``eps_root`` > 0 adds
    optax's epsilon inside the square root, ``sqrt(v_hat + eps_root) + eps`` (0, the
    default, is bitwise the plain update). See fastadam.reference.adam_step, which
    specifies every operation; results match it bit for bit. State (torch's names):
    ``step``, ``exp_avg``, ``exp_avg_sq`` [, ``max_exp_avg_sq``].

    The common parameters (``ema_decay``, ``num_threads``, ``max_grad_norm``,
    ``skip_nonfinite``), the storage formats (``master_weights``, ``state_dtype``,
    ``rounding``, ``seed``) and the behaviour every optimizer shares are documented on
    :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["adam"]
    _decoupled_default = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool | None = None,
        bias_correction: bool = True,
        eps_mode: str = "paper",
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        eps_root: float = 0.0,
        ema_decay: float | None = None,
        *,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled_weight_decay=decoupled_weight_decay,
                bias_correction=bias_correction,
                eps_mode=eps_mode,
                eps_root=eps_root,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p <- p*(1 - alpha*lambda)
    before the Adam update. Defaults as torch.optim.AdamW: ``weight_decay=1e-2``."""

    _decoupled_default = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = True,
        bias_correction: bool = True,
        eps_mode: str = "paper",
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        eps_root: float = 0.0,
        ema_decay: float | None = None,
        *,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction,
            eps_mode=eps_mode,
            num_threads=num_threads,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            eps_root=eps_root,
            ema_decay=ema_decay,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum (Polyak 1964) and Nesterov momentum
    (Sutskever et al. 2013), as torch.optim.SGD; one fused C pass per step.

    With alpha = ``lr``, mu = ``momentum``, tau = ``dampening``, lambda =
    ``weight_decay``::

        g <- g + lambda * p
        b <- g (first step), else b <- mu * b + (1 - tau) * g      (momentum_buffer)
        p <- p - alpha * (g + mu * b)   (nesterov)   or   p <- p - alpha * b

    (momentum == 0: p <- p - alpha * g, and no state.) ``nesterov`` needs momentum > 0
    and dampening == 0. Exact operation order: fastadam.reference.sgd_step. State:
    ``momentum_buffer`` (when momentum != 0). Common parameters:
    :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["sgd"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Adagrad(Optimizer):
    r"""AdaGrad (Duchi, Hazan & Singer 2011), as torch.optim.Adagrad.

    With eta_t = ``lr`` / (1 + (t - 1) * ``lr_decay``)::

        g <- g + lambda * p;   s <- s + g * g;   p <- p - eta_t * g / (sqrt(s) + eps)

    ``sum`` starts at ``initial_accumulator_value``. Exact operation order:
    fastadam.reference.adagrad_step. State: ``step``, ``sum``. Common parameters:
    :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["adagrad"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                lr_decay=lr_decay,
                weight_decay=weight_decay,
                initial_accumulator_value=initial_accumulator_value,
                eps=eps,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton 2012; centered: Graves 2013), as torch.optim.RMSprop.

    With rho = ``alpha``::

        v <- rho * v + (1 - rho) * g**2                         (square_avg)
        a <- rho * a + (1 - rho) * g      (centered: grad_avg)
        d  = sqrt(v - a**2) + eps  (centered)   or   sqrt(v) + eps
        b <- mu * b + g / d;  p <- p - lr * b   (momentum > 0)   or   p <- p - lr * g / d

    Exact operation order: fastadam.reference.rmsprop_step. State: ``step``,
    ``square_avg`` [, ``momentum_buffer``] [, ``grad_avg``]. Common parameters:
    :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["rmsprop"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                alpha=alpha,
                eps=eps,
                weight_decay=weight_decay,
                momentum=momentum,
                centered=centered,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Adamax(Optimizer):
    r"""AdaMax (Kingma & Ba 2015, Algorithm 2: Adam with the infinity norm), as
    torch.optim.Adamax::

        m <- beta1 * m + (1 - beta1) * g;   u <- max(beta2 * u, |g| + eps)
        p <- p - (alpha / (1 - beta1**t)) * m / u

    Exact operation order: fastadam.reference.adamax_step. State: ``step``, ``exp_avg``,
    ``exp_inf``. Common parameters: :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["adamax"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016: Adam with Nesterov momentum), as torch.optim.NAdam.

    With mu_t = beta1 * (1 - 0.5 * 0.96**(t * psi)), psi = ``momentum_decay``::

        m <- beta1 * m + (1 - beta1) * g;   v <- beta2 * v + (1 - beta2) * g**2
        p <- p - lr * (1 - mu_t) / (1 - prod_{i<=t} mu_i) * g / d
               - lr * mu_{t+1} / (1 - prod_{i<=t+1} mu_i) * m / d,
        d = sqrt(v / (1 - beta2**t)) + eps

    Exact operation order: fastadam.reference.nadam_step. State: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``mu_product`` (a float: the NumPy API keeps it in double). Common
    parameters: :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["nadam"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                momentum_decay=momentum_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class RAdam(Optimizer):
    r"""RAdam (Liu et al. 2020: Adam with a rectified variance), as torch.optim.RAdam.

    With rho_inf = 2 / (1 - beta2) - 1 and rho_t = rho_inf - 2t beta2**t / (1 - beta2**t):
    while rho_t <= 5, p <- p - lr * m / (1 - beta1**t) (SGD with momentum); then the
    Adam step scaled by the rectification r_t. Exact operation order:
    fastadam.reference.radam_step. State: ``step``, ``exp_avg``, ``exp_avg_sq``. Common
    parameters: :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["radam"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Lion(Optimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"); not in
    torch.optim.

        p <- p * (1 - lr * lambda)                        (decoupled weight decay)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g                  (exp_avg)

    sign(0) = 0 as torch.sign; a NaN passes through. Exact operation order:
    fastadam.reference.lion_step. State: ``exp_avg``. Common parameters:
    :class:`fastadam.optim.Optimizer`.
    """

    _rule = RULES["lion"]

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Callable[[int], float] = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        ema_decay: float | None = None,
        num_threads: int | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                weight_decay=weight_decay,
                maximize=maximize,
                ema_decay=ema_decay,
            ),
            num_threads,
            max_grad_norm,
            skip_nonfinite,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


def clip_grad_norm_(
    grads: NDArray[Any] | Iterable[Any], max_norm: float, num_threads: int | None = None
) -> float:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``: coefficient max_norm / (norm + 1e-6), applied only
    when below 1. Returns the norm before clipping (a float).

    The norm is computed in C in one read pass, in double precision, with the same bits
    for every thread count and SIMD path. The gradients must be writable and must not
    share memory (the same array twice would be scaled twice): both are checked before
    anything is written, whether or not clipping turns out to be needed. To clip without
    rewriting the gradients, pass ``max_grad_norm`` to the optimizer instead.
    """
    max_norm = check_max_norm(max_norm, "max_norm", allow_none=False)
    nt = check_threads(num_threads)
    if isinstance(grads, (str, bytes, dict)) or not (
        isinstance(grads, np.ndarray) or hasattr(grads, "__iter__")
    ):
        raise TypeError(f"grads must be an array or a list of arrays, got {type(grads).__name__}")
    grads = [grads] if isinstance(grads, np.ndarray) else list(grads)
    fmts = [
        _formats.grad_format(g.dtype.name) if isinstance(g, np.ndarray) else _formats.FMT_NATIVE
        for g in grads
    ]
    if any(f != _formats.FMT_NATIVE for f in fmts):  # 16-bit gradients
        sumsq, _nonfinite = _core.grad_stats(grads, nt, formats=fmts)
    else:  # checks dtype, contiguity, alignment
        sumsq, _nonfinite = _core.grad_stats(grads, nt)
    arrays = [np.asarray(g) for g in grads]
    extents = []
    for i, a in enumerate(arrays):
        if not a.flags.writeable:
            raise ValueError(f"grads[{i}] must be writable to be clipped in place")
        if a.nbytes:
            start = a.__array_interface__["data"][0]
            extents.append((start, start + a.nbytes, i))
    extents.sort()
    for (s0, e0, i0), (s1, e1, i1) in zip(extents, extents[1:]):
        if s1 < e0:
            i0, i1 = sorted((i0, i1))
            what = "is given twice" if (s0, e0) == (s1, e1) else "overlap"
            raise ValueError(
                f"grads[{i0}] and grads[{i1}] share memory ({what}): "
                f"clip_grad_norm_ would scale that memory twice; pass each "
                f"gradient once"
            )
    norm = math.sqrt(sumsq)
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0:
        with np.errstate(invalid="ignore"):  # inf * 0 = NaN, as torch's clipping gives
            for a in arrays:
                a *= a.dtype.type(coef)
    return norm


def _is_pair(x):
    try:
        return len(x) == 2
    except TypeError:
        return False
