"""Adam and AdamW optimizers over NumPy arrays: a thin class around one fused C call."""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from . import _core
from . import _sync  # after _core: see _sync's docstring
from ._options import (changed, check_count, check_flag, check_grad_scale,
                       check_max_norm, check_options, check_threads, clip_coefficient)

__all__ = ["Adam", "AdamW", "InverseSqrtDecay", "aligned_zeros", "clip_grad_norm_"]

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
               "maximize", "bias_correction", "eps_mode")
_ALIGN = 64
_group_key = operator.itemgetter(*_GROUP_KEYS)  # one C call per group per step


def aligned_zeros(shape, dtype=np.float32, align=_ALIGN):
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
    return raw[offset:offset + nbytes].view(dtype).reshape(dims)


def _staggered_zeros(like, page_offset):
    """Zeros shaped like `like`, 64-byte aligned, starting at `page_offset` (mod 4096,
    rounded up to 64) within a page when the buffer is large enough for it to matter."""
    nbytes = like.size * like.dtype.itemsize
    if nbytes < (1 << 16):
        return aligned_zeros(like.shape, like.dtype)
    want = -(-page_offset // _ALIGN) * _ALIGN % 4096
    raw = np.zeros(nbytes + 4096, dtype=np.uint8)
    offset = (want - raw.ctypes.data) % 4096
    return raw[offset:offset + nbytes].view(like.dtype).reshape(like.shape)


class InverseSqrtDecay:
    """The paper's decaying step size alpha_t = alpha / sqrt(t) (Kingma & Ba, section 4).

    Pass it as ``lr``: ``Adam(params, lr=InverseSqrtDecay(1e-3))``.
    """

    def __init__(self, alpha=1e-3):
        self.alpha = float(alpha)

    def __call__(self, t):
        return self.alpha / math.sqrt(t)

    def __repr__(self):
        return f"InverseSqrtDecay(alpha={self.alpha!r})"


class Adam:
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
    ``eps_mode="hat"`` selects the paper's "efficient version" (see fastadam.reference,
    which specifies every operation; results match it bit for bit).

    Parameters
    ----------
    params : list of arrays, or list of dicts ``{"params": [...], "lr": ..., ...}`` (param
        groups with per-group options, as torch). Arrays must be writable, C-contiguous,
        aligned, distinct and all of one dtype (float32 or float64).
    lr : float >= 0 or a callable ``lr(t) -> float`` of the 1-based step number (see
        :class:`InverseSqrtDecay`).
    num_threads : OpenMP threads for every step (None: OpenMP's default; else 1 to
        2**31 - 1, and never more than ``fastadam.config()['thread_cap']`` are used).
    max_grad_norm : if set, clip the global L2 norm of all gradients to it, as
        ``torch.nn.utils.clip_grad_norm_`` followed by the step would, but fused: one read
        pass computes the norm (deterministically) and the clip coefficient is folded into
        the update pass; gradients are not rewritten.
    skip_nonfinite : if True, a step whose gradients hold an inf or NaN changes nothing
        (parameters, moments, step counts) and ``step`` returns False.

    The moment buffers are allocated zeroed, 64-byte aligned; ``step`` allocates nothing.
    ``state_dict()`` mirrors torch's layout (per-parameter ``step``, ``exp_avg``,
    ``exp_avg_sq`` [, ``max_exp_avg_sq``], and ``param_groups``), with copies of the
    arrays.

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
    counts (``state_dict()['step_count']`` and each parameter's ``step``) consistent with
    the buffers: they are committed together, inside the C call.
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=None,
                 bias_correction=True, eps_mode="paper", num_threads=None,
                 max_grad_norm=None, skip_nonfinite=False):
        self._lock = _sync.new_lock(self)
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        self.defaults = dict(lr=lr, betas=tuple(betas) if _is_pair(betas) else betas, eps=eps,
                             weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                             decoupled_weight_decay=decoupled_weight_decay,
                             bias_correction=bias_correction, eps_mode=eps_mode)
        self._check_group(self.defaults, "defaults")
        self.num_threads = num_threads
        self.max_grad_norm = check_max_norm(max_grad_norm)
        self.skip_nonfinite = check_flag("skip_nonfinite", skip_nonfinite)
        if isinstance(params, (np.ndarray, dict)) or not hasattr(params, "__iter__"):
            raise TypeError("params must be a list of arrays or of param-group dicts, "
                            f"got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params is an empty list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        self._params = []   # the parameters the plan was built from, in group order
        self._states = []   # their state dicts (exp_avg, exp_avg_sq[, max_exp_avg_sq])
        self._group_of = []
        # tests force a SIMD path, a split and prefetching on/off through these
        self._isa, self._chunk, self._prefetch = -1, 0, -1
        self._plan = None
        self._applied = None
        for group in groups:
            self._add_group(group)
        self._rebuild()

    @property
    def num_threads(self):
        """OpenMP threads per step (None: OpenMP's default); may be changed between steps."""
        return self._num_threads or None

    @num_threads.setter
    def num_threads(self, value):
        self._num_threads = check_threads(value)

    @property
    def skip_nonfinite(self):
        """Skip (change nothing, return False) a step whose gradients hold an inf or NaN."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value):
        self._skip_nonfinite = check_flag("skip_nonfinite", value)

    @property
    def max_grad_norm(self):
        """Clip the global gradient norm to this (None: no clipping); may be changed."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value):
        self._max_grad_norm = check_max_norm(value)

    @property
    def last_grad_norm(self):
        """The unscaled global gradient norm of the last step, before clipping, when it
        was computed (max_grad_norm or skip_nonfinite), else None."""
        return self._plan.last_grad_norm

    @property
    def _step_count(self):
        return self._plan.step_count

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_group(group, where):
        lr = group["lr"]
        check_options(1.0 if callable(lr) else lr, group["betas"], group["eps"],
                      group["weight_decay"], group["decoupled_weight_decay"], group["amsgrad"],
                      group["maximize"], group["bias_correction"], group["eps_mode"])

    def _add_group(self, group):
        """Check a group and append it to param_groups (its state is made by _rebuild)."""
        if not isinstance(group, dict):
            raise TypeError(f"param groups must be dicts, got {type(group).__name__}")
        unknown = [k for k in group if k not in _GROUP_KEYS and k != "params"]
        if unknown:
            raise ValueError(f"unknown param-group options: {sorted(map(str, unknown))}")
        if "params" not in group:
            raise ValueError("a param group must have a 'params' entry")
        params = group["params"]
        if isinstance(params, (str, bytes, dict)) or not (
                isinstance(params, np.ndarray) or hasattr(params, "__iter__")):
            raise TypeError(f"a param group's 'params' must be an array or a list of arrays, "
                            f"got {type(params).__name__}")
        params = [params] if isinstance(params, np.ndarray) else list(params)
        if not params:
            raise ValueError("a param group has an empty 'params' list")
        gi = len(self.param_groups)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"duplicate parameters: an array appears twice "
                                 f"(param group {gi}, index {i})")
            seen.add(id(p))
            _as_param(p, f"param group {gi}, params[{i}]")
        new = {k: group.get(k, self.defaults[k]) for k in _GROUP_KEYS}
        new["betas"] = tuple(new["betas"]) if _is_pair(new["betas"]) else new["betas"]
        self._check_group(new, f"param group {gi}")
        new["params"] = params
        self.param_groups.append(new)

    @staticmethod
    def _new_state(a, amsgrad):
        # m, v (and v_max) start 1, 2 (and 3) KiB past the parameter's offset within a
        # 4 KiB page: buffers at the same page offset make the CPU suspect that a load
        # depends on an earlier store to another buffer ("4K aliasing"), which costs a
        # third of the in-cache speed.
        page = a.ctypes.data % 4096
        s = {"exp_avg": _staggered_zeros(a, page + 1024),
             "exp_avg_sq": _staggered_zeros(a, page + 2048)}
        if amsgrad:
            s["max_exp_avg_sq"] = _staggered_zeros(a, page + 3072)
        return s

    def add_param_group(self, param_group):
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

        states/steps: load_state_dict's new state, one per parameter in group order."""
        old = self._plan
        known = {}
        if old is not None:
            for p, s, c in zip(self._params, self._states, old.get_steps()):
                known[id(p)] = (s, c)
        params, new_states, counts, group_of = [], [], [], []
        seen = set()
        for gi, g in enumerate(self.param_groups):
            if not isinstance(g, dict) or not isinstance(g.get("params"), list):
                raise TypeError(f"param_groups[{gi}] must be a dict whose 'params' is a list "
                                f"of arrays")
            for j, p in enumerate(g["params"]):
                where = f"param group {gi}, params[{j}]"
                a = _as_param(p, where)
                if id(p) in seen:
                    raise ValueError(f"duplicate parameters: an array appears twice ({where})")
                seen.add(id(p))
                amsgrad = bool(g.get("amsgrad"))
                if states is not None:
                    s, c = states[len(params)], steps[len(params)]
                elif id(p) in known:
                    s, c = known[id(p)]
                    for k, v in s.items():
                        if v.dtype != a.dtype or v.size != a.size:
                            raise ValueError(
                                f"{where} is {_what(a)}, but its state {k!r} is {_what(v)}: a "
                                f"parameter and its state are updated in place and may not "
                                f"change their size or dtype (put a new array in the param "
                                f"group instead: it starts with fresh state)")
                    if any(v.shape != a.shape for v in s.values()):
                        # same elements, new shape: follow it
                        s = {k: v.reshape(a.shape) for k, v in s.items()}
                else:
                    s, c = self._new_state(a, amsgrad), 0
                if amsgrad and "max_exp_avg_sq" not in s:
                    # amsgrad switched on: the running maximum starts at zero
                    s = dict(s, max_exp_avg_sq=_staggered_zeros(a, a.ctypes.data % 4096 + 3072))
                params.append(p)
                new_states.append(s)
                counts.append(c)
                group_of.append(gi)
        plan = _core._Plan(params, [s["exp_avg"] for s in new_states],
                           [s["exp_avg_sq"] for s in new_states],
                           [s.get("max_exp_avg_sq") for s in new_states], group_of,
                           max(len(self.param_groups), 1))
        for i, c in enumerate(counts):
            plan.set_step(i, c)
        if old is not None:
            plan.step_count = old.step_count
            plan.last_grad_norm = old.last_grad_norm
        self._params, self._states, self._group_of, self._plan = (
            params, new_states, group_of, plan)
        self._ngroups = len(self.param_groups)
        self._applied = None

    # -------------------------------------------------------------------- step
    def step(self, grads, grad_scale=1.0):
        """Update every parameter in place from ``grads`` (one array, or None to skip, per
        parameter, in the order of the param groups) with one call into C.

        ``grad_scale``: the gradients are divided by it inside the pass (loss scaling).
        Returns True if the step was taken, False if ``skip_nonfinite`` skipped it. When
        the global gradient norm was computed (clipping or skip_nonfinite) it is left in
        ``self.last_grad_norm`` (unscaled, before clipping)."""
        with self._lock:
            plan = self._plan
            try:
                keys = [_group_key(g) for g in self.param_groups]
            except (KeyError, TypeError):
                raise ValueError("every param group must be a dict with every option "
                                 f"({', '.join(_GROUP_KEYS)}); add groups with "
                                 f"add_param_group") from None
            for i, k in enumerate(keys):
                if callable(k[0]):  # an lr schedule: evaluate it for this step
                    keys[i] = (k[0](plan.step_count + 1),) + k[1:]
            if grad_scale.__class__ is not float or grad_scale != 1.0:
                grad_scale = check_grad_scale(grad_scale)
            if changed(keys, self._applied):
                self._apply(keys)
            r = self._plan.step(grads, self._num_threads, self._chunk, self._isa, grad_scale,
                                self._skip_nonfinite, self._max_grad_norm or 0.0,
                                self._prefetch, self.param_groups)
            if r is None:
                # The parameters (or a state array) changed since the plan was built:
                # rebuild (or refuse), as torch.optim re-reads its param_groups.
                for attempt in range(3):
                    self._rebuild()
                    self._apply(keys)
                    r = self._plan.step(grads, self._num_threads, self._chunk, self._isa,
                                        grad_scale, self.skip_nonfinite,
                                        self.max_grad_norm or 0.0, self._prefetch,
                                        self.param_groups)
                    if r is not None:
                        break
                else:
                    raise RuntimeError("fastadam: the parameters kept changing while a step "
                                       "was being prepared (another thread?)")
            return r[0]

    def _apply(self, keys):
        """Check every group's options, then hand them to the plan (all or nothing)."""
        options = [check_options(*k) for k in keys]
        if len(options) != self._ngroups or any(options[gi].amsgrad and "max_exp_avg_sq" not in s
                                                for s, gi in zip(self._states, self._group_of)):
            self._rebuild()  # groups added, or amsgrad switched on: allocate v_max (zeros)
        for gi, o in enumerate(options):
            self._plan.set_options(gi, *o)
        self._applied = keys

    # ------------------------------------------------------------------- state
    @property
    def state(self):
        """Per-parameter state, in parameter order (live arrays; 'step' is a snapshot)."""
        with self._lock:
            steps = self._plan.get_steps()
            return [dict(s, step=steps[i]) for i, s in enumerate(self._states)]

    def state_dict(self):
        """torch-style: {'state': {index: {...}}, 'param_groups': [{..., 'params': [...]}],
        'step_count': steps taken}.

        Arrays are copies. Parameters that never took a step have no entry, as in torch.
        """
        with self._lock:
            steps = self._plan.get_steps()
            state = {}
            for i, s in enumerate(self._states):
                if steps[i] > 0:
                    entry = {"step": steps[i]}
                    for k in _STATE_KEYS:
                        if k in s:
                            entry[k] = s[k].copy()
                    state[i] = entry
            groups, i = [], 0
            for g in self.param_groups:
                d = {k: g[k] for k in _GROUP_KEYS}
                d["params"] = list(range(i, i + len(g["params"])))
                i += len(g["params"])
                groups.append(d)
            return {"state": state, "param_groups": groups, "step_count": self._plan.step_count}

    def load_state_dict(self, state_dict):
        """Load a state_dict() of an optimizer over parameters of the same shapes and dtype.

        Everything is checked first -- the layout (no missing or unknown keys), every
        group's options, every step count (an integer, 0 <= step < 2**62), every array's
        shape and dtype -- and an error names the entry; on error this optimizer is
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
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing the key {key!r}")
        unknown = [k for k in state_dict if k not in ("state", "param_groups", "step_count")]
        if unknown:
            raise ValueError(f"state_dict has unknown keys {_keys(unknown)}")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)):
            raise TypeError(f"state_dict['param_groups'] must be a list, got "
                            f"{type(saved_groups).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        new_groups, id_of = [], {}
        for gi, (saved, mine) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{gi}]"
            if not isinstance(saved, dict):
                raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
            missing = [k for k in _GROUP_KEYS + ("params",) if k not in saved]
            if missing:
                raise ValueError(f"{where} is missing {missing}")
            unknown = [k for k in saved if k not in _GROUP_KEYS and k != "params"]
            if unknown:
                raise ValueError(f"{where} has unknown keys {_keys(unknown)}")
            ids = saved["params"]
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"{where}['params'] must be a list of parameter ids, got "
                                f"{type(ids).__name__}")
            if len(ids) != len(mine["params"]):
                raise ValueError(f"param group {gi} has {len(mine['params'])} parameters, the "
                                 f"state_dict's has {len(ids)}")
            for j, k in enumerate(ids):
                if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
                    raise TypeError(f"{where}['params'][{j}] must be an int id, got {k!r}")
                if int(k) in id_of:
                    raise ValueError(f"{where}['params'][{j}]: the id {int(k)} appears twice")
                id_of[int(k)] = len(id_of)
            g = {k: saved[k] for k in _GROUP_KEYS}
            g["betas"] = tuple(g["betas"]) if _is_pair(g["betas"]) else g["betas"]
            self._check_group(g, where)
            g["params"] = mine["params"]
            new_groups.append(g)
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise TypeError(f"state_dict['state'] must be a dict, got "
                            f"{type(saved_state).__name__}")
        extra = [k for k in saved_state
                 if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer))
                 or int(k) not in id_of]
        if extra:
            raise ValueError(f"state_dict['state'] has entries for unknown parameters "
                             f"{_keys(extra)}")
        entries = {id_of[int(k)]: (k, v) for k, v in saved_state.items()}
        new_states, steps = [], []
        for g in new_groups:
            amsgrad = check_flag("amsgrad", g["amsgrad"])
            for p in g["params"]:
                pos = len(new_states)
                a = _as_param(p, f"parameter {pos}")
                s = self._new_state(a, amsgrad)
                step = 0
                if pos in entries:
                    key, entry = entries[pos]
                    where = f"state_dict['state'][{key!r}]"
                    if not isinstance(entry, dict):
                        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
                    need = ["step", "exp_avg", "exp_avg_sq"] + (
                        ["max_exp_avg_sq"] if amsgrad else [])
                    missing = [k for k in need if k not in entry]
                    if missing:
                        raise ValueError(f"{where} is missing {missing}")
                    unknown = [k for k in entry if k != "step" and k not in _STATE_KEYS]
                    if unknown:
                        raise ValueError(f"{where} has unknown keys {_keys(unknown)}")
                    step = check_count(f"{where}['step']", entry["step"])
                    for k in _STATE_KEYS:
                        if k not in entry:
                            continue
                        v = _as_saved_array(entry[k], f"{where}[{k!r}]")
                        if v.shape != a.shape or v.dtype != a.dtype:
                            raise ValueError(
                                f"{where}[{k!r}] must have shape {a.shape} and dtype "
                                f"{a.dtype}; got {v.shape} {v.dtype}")
                        if k not in s:
                            s[k] = _staggered_zeros(a, a.ctypes.data % 4096 + 3072)
                        s[k][...] = v
                new_states.append(s)
                steps.append(step)
        if "step_count" in state_dict:
            step_count = check_count("state_dict['step_count']", state_dict["step_count"])
        else:
            step_count = max(steps, default=0)
        return new_groups, new_states, steps, step_count

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {g.get(k)}" for k in _GROUP_KEYS]
        return "\n".join(lines + [")"])


_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _as_param(p, where):
    """p as an ndarray (a view, not a copy) if it can be a parameter, else TypeError."""
    try:
        a = np.asarray(p)
    except Exception as e:  # an object whose __array__ or buffer raises
        raise TypeError(f"{where} must be a float32 or float64 array, got "
                        f"{type(p).__name__} ({type(e).__name__}: {e})") from None
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{where}: params must have dtype float32 or float64, got "
                        f"{type(p).__name__} of dtype {a.dtype}")
    return a


def _as_saved_array(v, where):
    try:
        return np.asarray(v)
    except Exception as e:
        raise TypeError(f"{where} must be an array, got {type(v).__name__} "
                        f"({type(e).__name__}: {e})") from None


def _what(a):
    return f"a {a.shape} {a.dtype} array"


def _keys(keys):
    return sorted(map(repr, keys))


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p <- p*(1 - alpha*lambda)
    before the Adam update. Defaults as torch.optim.AdamW: ``weight_decay=1e-2``."""

    _decoupled_default = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, decoupled_weight_decay=True,
                 bias_correction=True, eps_mode="paper", num_threads=None,
                 max_grad_norm=None, skip_nonfinite=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         decoupled_weight_decay=decoupled_weight_decay,
                         bias_correction=bias_correction, eps_mode=eps_mode,
                         num_threads=num_threads, max_grad_norm=max_grad_norm,
                         skip_nonfinite=skip_nonfinite)


def clip_grad_norm_(grads, max_norm, num_threads=None):
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
            isinstance(grads, np.ndarray) or hasattr(grads, "__iter__")):
        raise TypeError(f"grads must be an array or a list of arrays, got "
                        f"{type(grads).__name__}")
    grads = [grads] if isinstance(grads, np.ndarray) else list(grads)
    sumsq, nonfinite = _core.grad_stats(grads, nt)  # checks dtype, contiguity, alignment
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
            raise ValueError(f"grads[{i0}] and grads[{i1}] share memory ({what}): "
                             f"clip_grad_norm_ would scale that memory twice; pass each "
                             f"gradient once")
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
