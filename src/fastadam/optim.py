"""Adam and AdamW optimizers over NumPy arrays: a thin class around one fused C call."""
from __future__ import annotations

import math
import operator

import numpy as np

from . import _core
from ._options import (EPS_MODES, check_grad_scale, check_max_norm, check_options,
                       check_threads, clip_coefficient)

__all__ = ["Adam", "AdamW", "InverseSqrtDecay", "aligned_zeros", "clip_grad_norm_"]

_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad",
               "maximize", "bias_correction", "eps_mode")
_ALIGN = 64
_group_key = operator.itemgetter(*_GROUP_KEYS)  # one C call per group per step


def aligned_zeros(shape, dtype=np.float32, align=_ALIGN):
    """A zero-filled C-contiguous array whose data starts on an `align`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


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
        distinct and all of one dtype (float32 or float64).
    lr : float >= 0 or a callable ``lr(t) -> float`` of the 1-based step number (see
        :class:`InverseSqrtDecay`).
    num_threads : OpenMP threads for every step (None: OpenMP's default).
    max_grad_norm : if set, clip the global L2 norm of all gradients to it, as
        ``torch.nn.utils.clip_grad_norm_`` followed by the step would, but fused: one read
        pass computes the norm (deterministically) and the clip coefficient is folded into
        the update pass; gradients are not rewritten.
    skip_nonfinite : if True, a step whose gradients hold an inf or NaN changes nothing
        (parameters, moments, step counts) and ``step`` returns False.

    The moment buffers are allocated zeroed, 64-byte aligned, at construction; ``step``
    allocates nothing. ``state_dict()`` mirrors torch's layout (per-parameter ``step``,
    ``exp_avg``, ``exp_avg_sq`` [, ``max_exp_avg_sq``], and ``param_groups``), with copies
    of the arrays.
    """

    _decoupled_default = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, decoupled_weight_decay=None,
                 bias_correction=True, eps_mode="paper", num_threads=None,
                 max_grad_norm=None, skip_nonfinite=False):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        self.defaults = dict(lr=lr, betas=tuple(betas) if _is_pair(betas) else betas, eps=eps,
                             weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                             decoupled_weight_decay=decoupled_weight_decay,
                             bias_correction=bias_correction, eps_mode=eps_mode)
        self._check_group(self.defaults, "defaults")
        self.num_threads = num_threads
        self.max_grad_norm = check_max_norm(max_grad_norm)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.last_grad_norm = None
        if isinstance(params, np.ndarray) or not hasattr(params, "__iter__"):
            raise TypeError("params must be a list of arrays or of param-group dicts, "
                            f"got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params is an empty list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        self._states = []  # one dict per parameter, in order: exp_avg, exp_avg_sq[, max_...]
        self._step_count = 0
        # tests force a SIMD path, a split and prefetching on/off through these
        self._isa, self._chunk, self._prefetch = -1, 0, -1
        self._plan = None
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

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_group(group, where):
        lr = group["lr"]
        check_options(1.0 if callable(lr) else lr, group["betas"], group["eps"],
                      group["weight_decay"], group["decoupled_weight_decay"], group["amsgrad"],
                      group["maximize"], group["bias_correction"], group["eps_mode"])

    def _add_group(self, group):
        if not isinstance(group, dict):
            raise TypeError(f"param groups must be dicts, got {type(group).__name__}")
        unknown = set(group) - set(_GROUP_KEYS) - {"params"}
        if unknown:
            raise ValueError(f"unknown param-group options: {sorted(unknown)}")
        if "params" not in group:
            raise ValueError("a param group must have a 'params' entry")
        params = group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        if not params:
            raise ValueError("a param group has an empty 'params' list")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if id(p) in seen:
                raise ValueError(f"duplicate parameters: an array appears twice "
                                 f"(param group {len(self.param_groups)}, index {i})")
            seen.add(id(p))
        new = {k: group.get(k, self.defaults[k]) for k in _GROUP_KEYS}
        new["betas"] = tuple(new["betas"]) if _is_pair(new["betas"]) else new["betas"]
        self._check_group(new, f"param group {len(self.param_groups)}")
        new["params"] = params
        for p in params:
            a = np.asarray(p)
            if a.dtype not in (np.float32, np.float64):
                raise TypeError(f"params must have dtype float32 or float64, got {a.dtype}")
            self._states.append(self._new_state(a, new["amsgrad"]))
        self.param_groups.append(new)

    @staticmethod
    def _new_state(a, amsgrad):
        # m, v (and v_max) start 1, 2 (and 3) KiB past the parameter's offset within a
        # 4 KiB page: buffers at the same page offset make the CPU suspect that a load
        # depends on an earlier store to another buffer ("4K aliasing"), which costs a
        # third of the in-cache speed.
        page = a.ctypes.data % 4096
        s = {"step": 0, "exp_avg": _staggered_zeros(a, page + 1024),
             "exp_avg_sq": _staggered_zeros(a, page + 2048)}
        if amsgrad:
            s["max_exp_avg_sq"] = _staggered_zeros(a, page + 3072)
        return s

    def add_param_group(self, param_group):
        """Add a group (a dict with 'params' and options; missing options take the defaults)."""
        n = len(self._states)
        self._add_group(param_group)
        try:
            self._rebuild()
        except BaseException:
            self.param_groups.pop()
            del self._states[n:]
            self._rebuild()
            raise

    def _rebuild(self):
        steps = self._plan.get_steps() if self._plan is not None else []
        params, groups = [], []
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                params.append(p)
                groups.append(gi)
                if g["amsgrad"] and "max_exp_avg_sq" not in self._states[len(params) - 1]:
                    a = np.asarray(p)
                    self._states[len(params) - 1]["max_exp_avg_sq"] = _staggered_zeros(
                        a, a.ctypes.data % 4096 + 3072)
        st = self._states
        plan = _core._Plan(params, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                           [s.get("max_exp_avg_sq") for s in st], groups,
                           len(self.param_groups))
        for i, s in enumerate(steps):
            plan.set_step(i, s)
        self._plan = plan
        self._applied = [None] * len(self.param_groups)

    # -------------------------------------------------------------------- step
    def step(self, grads, grad_scale=1.0):
        """Update every parameter in place from ``grads`` (one array, or None to skip, per
        parameter, in the order of the param groups) with one call into C.

        ``grad_scale``: the gradients are divided by it inside the pass (loss scaling).
        Returns True if the step was taken, False if ``skip_nonfinite`` skipped it. When
        the global gradient norm was computed (clipping or skip_nonfinite) it is left in
        ``self.last_grad_norm`` (unscaled, before clipping)."""
        t = self._step_count + 1
        keys = [_group_key(g) for g in self.param_groups]
        for i, k in enumerate(keys):
            if callable(k[0]):  # an lr schedule: evaluate it for this step
                keys[i] = (k[0](t),) + k[1:]
        if keys != self._applied:
            self._apply(keys)
        if grad_scale != 1.0:
            grad_scale = check_grad_scale(grad_scale)
        stepped, self.last_grad_norm = self._plan.step(
            grads, self._num_threads, self._chunk, self._isa, grad_scale,
            self.skip_nonfinite, self.max_grad_norm or 0.0, self._prefetch)
        if stepped:
            self._step_count = t
        return stepped

    def _apply(self, keys):
        """Check every group's options, then hand them to the plan (all or nothing)."""
        options = [check_options(*k) for k in keys]
        if any(o.amsgrad and "max_exp_avg_sq" not in s
               for o, g in zip(options, self.param_groups) for s in self._group_states(g)):
            self._rebuild()  # amsgrad was switched on: allocate v_max (zeros)
        for gi, o in enumerate(options):
            self._plan.set_options(gi, *o)
        self._applied = keys

    def _group_states(self, group):
        start = 0
        for g in self.param_groups:
            if g is group:
                return self._states[start:start + len(g["params"])]
            start += len(g["params"])
        return []

    # ------------------------------------------------------------------- state
    @property
    def state(self):
        """Per-parameter state, in parameter order (live arrays; 'step' is a snapshot)."""
        steps = self._plan.get_steps()
        return [dict(s, step=steps[i]) for i, s in enumerate(self._states)]

    def state_dict(self):
        """torch-style: {'state': {index: {...}}, 'param_groups': [{..., 'params': [...]}]}.

        Arrays are copies. Parameters that never took a step have no entry, as in torch.
        """
        steps = self._plan.get_steps()
        state = {}
        for i, s in enumerate(self._states):
            if steps[i] > 0:
                entry = {"step": steps[i]}
                for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if k in s:
                        entry[k] = s[k].copy()
                state[i] = entry
        groups, i = [], 0
        for g in self.param_groups:
            d = {k: g[k] for k in _GROUP_KEYS}
            d["params"] = list(range(i, i + len(g["params"])))
            i += len(g["params"])
            groups.append(d)
        return {"state": state, "param_groups": groups, "step_count": self._step_count}

    def load_state_dict(self, state_dict):
        """Load a state_dict() of an optimizer over parameters of the same shapes and dtype.

        Everything is checked first; on error this optimizer is unchanged.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing the key {key!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer "
                             f"has {len(self.param_groups)}")
        new_groups = []
        for gi, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            missing = [k for k in _GROUP_KEYS + ("params",) if k not in saved]
            if missing:
                raise ValueError(f"state_dict['param_groups'][{gi}] is missing {missing}")
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"param group {gi} has {len(mine['params'])} parameters, the "
                                 f"state_dict's has {len(saved['params'])}")
            g = {k: saved[k] for k in _GROUP_KEYS}
            g["betas"] = tuple(g["betas"]) if _is_pair(g["betas"]) else g["betas"]
            self._check_group(g, f"state_dict['param_groups'][{gi}]")
            g["params"] = mine["params"]
            new_groups.append(g)
        saved_state = state_dict["state"]
        if not isinstance(saved_state, dict):
            raise TypeError("state_dict['state'] must be a dict")
        n = len(self._states)
        extra = [k for k in saved_state if not (isinstance(k, int) and 0 <= k < n)]
        if extra:
            raise ValueError(f"state_dict['state'] has entries for unknown parameters {extra}")
        new_states, steps, i = [], [], 0
        for g in new_groups:
            for p in g["params"]:
                a = np.asarray(p)
                s = self._new_state(a, g["amsgrad"])
                entry = saved_state.get(i)
                step = 0
                if entry is not None:
                    need = ["step", "exp_avg", "exp_avg_sq"] + (
                        ["max_exp_avg_sq"] if g["amsgrad"] else [])
                    missing = [k for k in need if k not in entry]
                    if missing:
                        raise ValueError(f"state_dict['state'][{i}] is missing {missing}")
                    step = entry["step"]
                    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
                            or step < 0:
                        raise ValueError(f"state_dict['state'][{i}]['step'] must be an int "
                                         f">= 0, got {step!r}")
                    for k in need[1:]:
                        v = np.asarray(entry[k])
                        if v.shape != a.shape or v.dtype != a.dtype:
                            raise ValueError(
                                f"state_dict['state'][{i}][{k!r}] must have shape {a.shape} "
                                f"and dtype {a.dtype}; got {v.shape} {v.dtype}")
                        s[k][...] = v
                new_states.append(s)
                steps.append(int(step))
                i += 1
        self.param_groups = new_groups
        self._states = new_states
        self._plan = None
        self._rebuild()
        for i, s in enumerate(steps):
            self._plan.set_step(i, s)
        self._step_count = int(state_dict.get("step_count", max(steps, default=0)))

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {g[k]}" for k in _GROUP_KEYS]
        return "\n".join(lines + [")"])


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
    for every thread count and SIMD path. To clip without rewriting the gradients, pass
    ``max_grad_norm`` to the optimizer instead.
    """
    max_norm = check_max_norm(max_norm)
    if max_norm is None:
        raise TypeError("max_norm must be a number > 0")
    grads = [grads] if isinstance(grads, np.ndarray) else list(grads)
    sumsq, nonfinite = _core.grad_stats(grads, check_threads(num_threads))
    norm = math.sqrt(sumsq)
    coef = clip_coefficient(norm, max_norm)
    if coef < 1.0:
        for g in grads:
            a = np.asarray(g)
            if not a.flags.writeable:
                raise ValueError("grads must be writable to be clipped in place")
        for g in grads:
            a = np.asarray(g)
            a *= a.dtype.type(coef)
    return norm


def _is_pair(x):
    try:
        return len(x) == 2
    except TypeError:
        return False
