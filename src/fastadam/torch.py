"""fastadam.torch: ``torch.optim.Adam`` / ``AdamW`` on the fused fastadam C core.

Switch by changing one import::

    from fastadam.torch import Adam          # instead of: from torch.optim import Adam
    opt = Adam(model.parameters(), lr=1e-3)  # same signature, defaults, state and checkpoints

Every step is ONE call into C over all parameters (one per dtype when a model mixes
float32 and float64): the parameters and torch's own state tensors (``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) are updated in place through zero-copy NumPy views of
their memory; nothing is copied to or from NumPy. The arithmetic is
``torch.optim.Adam(foreach=False)``'s to within about an ulp per step (see
``fastadam.reference``).

``import fastadam`` never imports torch; this module does.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np
import torch as _torch
from torch.optim import Optimizer as _Optimizer

from fastadam import _core, _sync
from fastadam.functional import ADAM_STATE, RULE_ADAM, adam_plan_options
from fastadam._options import (changed, check_grad_scale, check_max_norm, check_options,
                               check_threads)

__all__ = ["Adam", "AdamW"]

_Tensor = _torch.Tensor
_STRIDED = _torch.strided
# parameter dtype -> (the dtype of the plan that updates it, viewed as real?)
_SUPPORTED = {_torch.float32: ("float32", False), _torch.float64: ("float64", False),
              _torch.complex64: ("float32", True), _torch.complex128: ("float64", True)}
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _scalar(x):
    """A hyperparameter as a Python number (torch allows 1-element tensors)."""
    return x.item() if isinstance(x, _Tensor) else x


def _step_dtype():
    # torch.optim.Adam (not fused, not capturable): float32, float64 if that is the default
    return _torch.float64 if _torch.get_default_dtype() == _torch.float64 else _torch.float32


def _describe(p):
    return f"a {tuple(p.shape)} {str(p.dtype).replace('torch.', '')} tensor on {p.device}"


def _check_param(p, where):
    """Raise a clear error unless fastadam can update p in place."""
    if not isinstance(p, _Tensor):
        raise TypeError(f"{where}: optimizer can only optimize Tensors, got {type(p).__name__}")
    if p.layout is not _STRIDED:
        raise ValueError(f"{where} is a {p.layout} tensor; fastadam.torch updates dense "
                         f"(strided) CPU tensors")
    if p.device.type != "cpu":
        raise ValueError(f"{where} is {_describe(p)}; fastadam.torch updates parameters in "
                         f"CPU memory (keep the model, or an fp32 master copy of its "
                         f"parameters, on the CPU)")
    if p.dtype not in _SUPPORTED:
        raise TypeError(f"{where} is {_describe(p)}; fastadam.torch supports float32 and "
                        f"float64 parameters (and complex64/complex128, viewed as real)")
    if not p.is_contiguous():
        raise ValueError(f"{where} is {_describe(p)} that is not contiguous (strides "
                         f"{p.stride()}); fastadam.torch updates contiguous parameters in "
                         f"place (make it contiguous before building the optimizer)")


def _check_torch_hyperparameters(lr, betas, eps, weight_decay):
    """torch.optim.Adam's own checks, with its exception types and messages, so that code
    written against torch.optim sees the same errors (fastadam's stricter checks, e.g.
    finiteness, come after these)."""
    if isinstance(lr, _Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    for name, x in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)) + tuple(
            (f"betas[{i}]", b) for i, b in enumerate(betas if isinstance(betas, tuple) else ())):
        if isinstance(x, _Tensor) and (x.is_complex() or x.device.type == "meta"):
            raise TypeError(f"{name} must be a real number or a real 1-element tensor, got "
                            f"{_describe(x)}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    try:
        b0, b1 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    if not 0.0 <= b0 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {b0}")
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {b1}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _number(name, x):
    """A number or a 1-element tensor (as torch allows for grad_scale and found_inf) as a
    Python number; anything else is a TypeError naming the argument."""
    if isinstance(x, _Tensor):
        if x.numel() != 1 or x.is_complex() or x.device.type == "meta":
            raise TypeError(f"{name} must be a number or a 1-element real tensor, got "
                            f"{_describe(x)}")
        return x.item()
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        return x
    raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(x).__name__}")


def _view(t):
    """Zero-copy NumPy view of a CPU tensor's memory (complex viewed as real)."""
    if t.requires_grad:
        t = t.detach()
    if t.is_complex():
        t = _torch.view_as_real(t)
    return t.numpy()


class _Cache:
    """The plans of one optimizer and what they were built from. A step reuses them
    while every parameter, every state dict and every state tensor is still the same
    object with the same data pointer; it checks that with identity comparisons and
    one data_ptr() per tensor (the storages are held, so an address cannot be reused
    by another allocation while the plans point at it)."""

    __slots__ = ("ids", "tensors", "ptrs", "storages", "slots", "plans", "amsgrad", "state",
                 "state_ids", "inner_ids", "shapes")

    def __init__(self):
        self.ids = []        # id() of every parameter, in param-group order
        self.tensors = []    # every parameter, then every state tensor the plans use
        self.ptrs = []       # their data_ptr() when the plans were built
        self.storages = []   # their storages, held so that their memory stays put
        self.slots = []      # (plan, block, complex), or None for a parameter without state
        self.plans = []      # one _core._Plan per element dtype
        self.amsgrad = ()    # each group's amsgrad flag when built
        self.state = None    # the optimizer's state dict object
        self.state_ids = []  # id() of each per-parameter state dict, in order
        self.inner_ids = []  # id() of every value in them (the state tensors), in order
        self.shapes = []     # every parameter's shape when built


_MISSING = object()


class _SparseGradientError(TypeError, RuntimeError):
    """torch.optim.Adam raises RuntimeError for a sparse gradient; this is also a
    TypeError, as every other refused input of fastadam."""
_grad_of = operator.attrgetter("grad")
_shape_of = operator.attrgetter("shape")
_data_ptr = _Tensor.data_ptr


def _state_ids(state):
    values = list(state.values())
    inner = []
    for v in values:
        if isinstance(v, dict):
            inner.extend(map(id, v.values()))
    return list(map(id, values)), inner


class Adam(_Optimizer):
    r"""Adam (Kingma & Ba, 2015) as ``torch.optim.Adam``, on fastadam's fused C core.

    Same constructor, defaults, ``param_groups``, ``state`` and ``state_dict()`` as
    ``torch.optim.Adam``, so it works with ``torch.optim.lr_scheduler``, hooks,
    ``torch.amp.GradScaler``, checkpoints written by (or for) torch.optim.Adam and
    ``torch.distributed.optim.ZeroRedundancyOptimizer``. Parameters must be dense,
    contiguous CPU tensors of dtype float32 or float64 (complex64/complex128 are updated
    as pairs of reals, as torch does). Each ``step()`` updates every parameter whose
    ``.grad`` is not None with one call into C (one per dtype), in place; parameters whose
    ``.grad`` is None are skipped exactly as torch skips them (their state and step count
    do not move).

    Args:
        params: iterable of parameters or of param-group dicts.
        lr (float or 0-dim Tensor): step size (default 1e-3).
        betas (tuple): (beta1, beta2), floats or 1-element tensors (default (0.9, 0.999)).
        eps (float): added to the denominator (default 1e-8).
        weight_decay (float): L2 penalty added to the gradient, or with
            ``decoupled_weight_decay=True`` (AdamW) p *= 1 - lr * weight_decay (default 0).
        amsgrad (bool): use the running maximum of ``exp_avg_sq`` (default False).
        foreach, fused: accepted for compatibility and have no effect: fastadam always runs
            its own fused, multithreaded pass.
        maximize (bool): ascend instead of descend (default False).
        capturable, differentiable: must be False (CUDA graphs and differentiating through
            the step are not supported: NotImplementedError).
        decoupled_weight_decay (bool): AdamW's decay (default False).
        max_grad_norm (float or None): fastadam extra. Clip the global L2 norm of all
            gradients of this optimizer to it, as ``torch.nn.utils.clip_grad_norm_`` before
            the step would, but fused: one read pass computes the norm (in double, the same
            bits for every thread count), the coefficient is folded into the update and the
            ``.grad`` tensors are not modified. The norm before clipping is left in
            ``last_grad_norm``. Under ZeroRedundancyOptimizer each rank sees only its shard,
            so clip with ``torch.nn.utils.clip_grad_norm_`` there instead.
        num_threads (int or None): fastadam extra. OpenMP threads per step (None: OpenMP's
            default, ``OMP_NUM_THREADS``; else 1 to 2**31 - 1). The result is the same bits
            for every value.

    The hyperparameters torch checks are refused with torch's exception types and
    messages (``ValueError: Invalid learning rate: -1.0``, ...); fastadam also refuses
    non-finite ones. Every other error names the parameter by its param group and its
    index in that group.

    ``step(closure=None, grad_scale=None, found_inf=None)``: ``grad_scale`` (a number or
    1-element tensor) divides every gradient inside the kernel; if ``found_inf`` is nonzero
    the step changes nothing (parameters, moments and step counts). ``torch.amp.GradScaler``
    passes both through its fused-optimizer protocol (``_step_supports_amp_scaling``), so
    ``scaler.step(opt)`` needs no separate unscale pass. A step checks every parameter,
    gradient and state tensor of every dtype before it moves any; a step that is refused
    creates no state. Parameters or state tensors replaced between steps (``p.data = ...``,
    ``state[p]['exp_avg'].set_(...)``, a new tensor in ``param_groups``) are picked up or
    refused with a clear error, never written through a stale pointer.

    ``state[p]['step']`` is a 0-dim float32 tensor as in torch and is the step count
    fastadam uses: read before and written after each step inside the C call (so an
    exception around a step never leaves it behind the buffers). Any count torch accepts
    works -- fractional, beyond 2**53, inf; like torch's, a float32 count stops growing at
    2**24 -- except a negative or NaN one, which is refused (torch would divide by zero or
    step in the wrong direction).

    Threads and fork: as :class:`fastadam.Adam` (one lock per optimizer; the C passes of
    the process run one at a time; after ``os.fork()`` the child steps on one thread).
    """

    _step_supports_amp_scaling = True
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, num_threads=None):
        name = type(self).__name__
        self._lock = _sync.new_lock(self)
        if capturable:
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support capturable=True (CUDA graph "
                f"capture); it updates CPU tensors. Use torch.optim.{name} for that.")
        if differentiable:
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support differentiable=True: the step runs "
                f"in C, outside autograd. Use torch.optim.{name} to differentiate through it.")
        try:
            beta_pair = tuple(betas)
            assert len(beta_pair) == 2
        except Exception:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        _check_torch_hyperparameters(lr, beta_pair, eps, weight_decay)
        for i, b in enumerate(beta_pair):
            if isinstance(b, _Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if isinstance(beta_pair[0], _Tensor) != isinstance(beta_pair[1], _Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        betas = tuple(b.squeeze() if isinstance(b, _Tensor) and b.dim() else b
                      for b in beta_pair)
        check_options(_scalar(lr), tuple(_scalar(b) for b in betas), eps, weight_decay,
                      decoupled_weight_decay, amsgrad, maximize, True, "paper")
        self.max_grad_norm = check_max_norm(max_grad_norm)
        check_threads(num_threads)
        self.num_threads = num_threads
        self.last_grad_norm = None
        self._cache = None
        self._applied = None
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group):
        """As torch's; also checks that fastadam can update the new parameters and that
        the group's options are valid."""
        with self._lock:
            if not isinstance(param_group, dict):
                raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
            if "params" not in param_group:
                raise ValueError("a param group must have a 'params' entry")
            if not isinstance(param_group["params"], set):  # torch refuses sets itself
                params = param_group["params"]
                params = [params] if isinstance(params, _Tensor) else list(params)
                param_group["params"] = params
                gi = len(self.param_groups)
                for i, p in enumerate(params):
                    _check_param(p[1] if isinstance(p, tuple) else p,
                                 f"param group {gi}, parameter {i}")
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            try:
                if group.get("capturable") or group.get("differentiable"):
                    raise NotImplementedError("fastadam.torch: capturable and differentiable "
                                              "must be False")
                self._options_of(group)
            except BaseException:
                self.param_groups.pop()
                raise
            self._cache = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_fastadam"] = {"max_grad_norm": self.max_grad_norm,
                              "num_threads": self.num_threads}
        return state

    def __setstate__(self, state):
        if "_lock" not in self.__dict__:  # unpickling: __init__ did not run
            self._lock = _sync.new_lock(self)
        with self._lock:
            if isinstance(state, dict) and "param_groups" in self.__dict__ \
                    and "state" in state and "param_groups" in state:
                # load_state_dict: check everything before anything is replaced
                self._check_loaded(state["state"], state["param_groups"])
            extra = state.pop("_fastadam", None) if isinstance(state, dict) else None
            super().__setstate__(state)
            if extra is not None:
                self.__dict__.update(extra)
            for name, default in (("max_grad_norm", None), ("num_threads", None),
                                  ("last_grad_norm", None)):
                self.__dict__.setdefault(name, default)
            for group in self.param_groups:
                group.setdefault("amsgrad", False)
                group.setdefault("maximize", False)
                group.setdefault("foreach", None)
                group.setdefault("capturable", False)
                group.setdefault("differentiable", False)
                group.setdefault("fused", None)
                group.setdefault("decoupled_weight_decay", self._decoupled)
                if self._decoupled:
                    group["decoupled_weight_decay"] = True
                for p in group["params"]:
                    s = self.state.get(p)
                    if s and "step" in s and not isinstance(s["step"], _Tensor):
                        s["step"] = _torch.tensor(float(s["step"]), dtype=_step_dtype())
            self._cache = None   # state or groups were replaced: rebuild the plans
            self._applied = None

    def load_state_dict(self, state_dict):
        """As torch's, but everything is checked before anything is replaced: the layout,
        every group's options, and every parameter's state (only Adam's keys, the
        parameter's shape, a step count >= 0); an error names the parameter by group and
        index, and leaves this optimizer unchanged."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing}")
        unknown = [k for k in state_dict if k not in ("state", "param_groups")]
        if unknown:
            raise ValueError(f"state_dict has unknown keys {sorted(map(repr, unknown))}")
        if not isinstance(state_dict["state"], dict):
            raise TypeError("state_dict['state'] must be a dict")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                for g in groups):
            raise TypeError("state_dict['param_groups'] must be a list of dicts, each with "
                            "a 'params' list")
        for key, entry in state_dict["state"].items():
            if not isinstance(entry, dict):
                raise TypeError(f"state_dict['state'][{key!r}] must be a dict, got "
                                f"{type(entry).__name__}")
            for k, t in entry.items():
                # torch's load_state_dict copies tensors to the parameter's device first
                if isinstance(t, _Tensor) and (t.device.type != "cpu" or t.layout is not _STRIDED):
                    raise ValueError(f"state_dict['state'][{key!r}][{k!r}] is {_describe(t)} "
                                     f"({t.layout}); fastadam.torch's state is dense CPU tensors")
        with self._lock:
            super().load_state_dict(state_dict)

    def _check_loaded(self, state, groups):
        """Raise unless (state, groups), as torch's load_state_dict is about to install
        them, can be stepped."""
        if not isinstance(state, dict):
            raise TypeError("state_dict['state'] must be a dict")
        params = {}
        for gi, g in enumerate(groups):
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
            if missing:
                raise ValueError(f"state_dict['param_groups'][{gi}] lacks {missing}")
            self._options_of(g)
            for i, p in enumerate(g["params"]):
                params[id(p)] = (p, f"param group {gi}, parameter {i}", bool(g.get("amsgrad")))
        for p, s in state.items():
            if id(p) not in params:
                raise ValueError("state_dict['state'] has an entry for an unknown parameter")
            p, where, amsgrad = params[id(p)]
            if not isinstance(s, dict):
                raise TypeError(f"the state of {where} must be a dict, got {type(s).__name__}")
            unknown = [k for k in s if k not in ("step",) + _STATE_KEYS]
            if unknown:
                raise ValueError(f"the state of {where} has unknown keys "
                                 f"{sorted(map(repr, unknown))} (not an Adam state?)")
            if not s:
                continue
            missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
            if missing:
                raise ValueError(f"the state of {where} lacks {missing}")
            _step_value(s["step"], where)
            for k in _STATE_KEYS:
                t = s.get(k)
                if t is None and k == "max_exp_avg_sq":
                    continue  # made (zeros) when amsgrad needs it
                if not isinstance(t, _Tensor):
                    raise TypeError(f"state[{k!r}] of {where} must be a tensor, got "
                                    f"{type(t).__name__}")
                if t.shape != p.shape or t.layout is not _STRIDED or t.device.type != "cpu":
                    raise ValueError(f"state[{k!r}] of {where} is {_describe(t)} "
                                     f"({t.layout}); it must be a dense CPU tensor of the "
                                     f"parameter's shape {tuple(p.shape)}")

    # -------------------------------------------------------------------- plans
    @staticmethod
    def _options_of(group):
        """The group's hyperparameters, checked (torch's messages first), as
        _Plan.set_options takes them."""
        b = group["betas"]
        try:
            b1, b2 = b
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {b!r}") from None
        _check_torch_hyperparameters(group["lr"], (b1, b2), group["eps"],
                                     group["weight_decay"])
        return check_options(_scalar(group["lr"]), (_scalar(b1), _scalar(b2)),
                             _scalar(group["eps"]), _scalar(group["weight_decay"]),
                             group["decoupled_weight_decay"], group["amsgrad"],
                             group["maximize"], True, "paper")

    @staticmethod
    def _new_state(p, amsgrad):
        s = {"step": _torch.tensor(0.0, dtype=_step_dtype()),
             "exp_avg": _torch.zeros_like(p, memory_format=_torch.preserve_format),
             "exp_avg_sq": _torch.zeros_like(p, memory_format=_torch.preserve_format)}
        if amsgrad:
            s["max_exp_avg_sq"] = _torch.zeros_like(p, memory_format=_torch.preserve_format)
        return s

    @staticmethod
    def _state_updates(p, s, amsgrad, where):
        """What s needs to be usable by the plan (a dict of replacements, applied only once
        the whole step has been checked): max_exp_avg_sq when amsgrad was switched on, a
        0-dim float step tensor, contiguous state tensors. Raises if s cannot be used."""
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
        if missing:
            raise ValueError(f"state of {where} lacks {missing}")
        updates = {}
        if amsgrad and s.get("max_exp_avg_sq") is None:
            # amsgrad switched on after the state was made: start the maximum at zero
            updates["max_exp_avg_sq"] = _torch.zeros_like(
                p, memory_format=_torch.preserve_format)
        step = s["step"]
        value = _step_value(step, where)
        if not (isinstance(step, _Tensor) and step.dim() == 0 and step.device.type == "cpu"
                and step.dtype in (_torch.float32, _torch.float64) and not step.requires_grad
                and step.is_contiguous()):
            # a Python number, an integer or 1-element tensor: torch's own float tensor
            updates["step"] = _torch.tensor(value, dtype=_step_dtype())
        for k in _STATE_KEYS:
            t = s.get(k)
            if t is None and k == "max_exp_avg_sq":
                continue
            if not isinstance(t, _Tensor):
                raise TypeError(f"state[{k!r}] of {where} must be a tensor, got "
                                f"{type(t).__name__}")
            if (t.shape != p.shape or t.dtype != p.dtype or t.device != p.device
                    or t.layout is not _STRIDED):
                raise ValueError(f"state[{k!r}] of {where} is {_describe(t)}; it must match "
                                 f"the parameter, {_describe(p)}")
            if t.layout is not _STRIDED or not t.is_contiguous():
                updates[k] = t.contiguous()  # a (rare) copy, kept as the state from now on
        return updates

    def _rebuild(self, init):
        """(Re)build the plans from the parameters and their state tensors. All or
        nothing: the state is changed (created, completed) only once every parameter and
        plan has been checked.

        init: also create the state of parameters that have a grad and no state yet
        (torch's lazy initialisation at their first step)."""
        c = _Cache()
        per_dtype = {}  # plan dtype -> (params, m, v, vmax, groups, labels, steps, slots)
        pending = []    # (p, new state dict or None, updates)
        state_tensors = []
        for gi, group in enumerate(self.param_groups):
            amsgrad = bool(group["amsgrad"])
            for i, p in enumerate(group["params"]):
                where = f"param group {gi}, parameter {i}"
                _check_param(p, where)
                c.ids.append(id(p))
                c.tensors.append(p)
                c.shapes.append(p.shape)
                s = self.state.get(p)
                if not s:
                    if not init or p.grad is None:
                        c.slots.append(None)
                        continue
                    s = self._new_state(p, amsgrad)
                    pending.append((p, s, None))
                else:
                    updates = self._state_updates(p, s, amsgrad, where)
                    if updates:
                        pending.append((p, None, updates))
                        s = dict(s, **updates)
                key, cplx = _SUPPORTED[p.dtype]
                lists = per_dtype.setdefault(key, ([], [], [], [], [], [], [], []))
                lists[0].append(_view(p))
                lists[1].append(_view(s["exp_avg"]))
                lists[2].append(_view(s["exp_avg_sq"]))
                vmax = s.get("max_exp_avg_sq")
                lists[3].append(None if vmax is None else _view(vmax))
                lists[4].append(gi)
                lists[5].append(where)
                lists[6].append(s["step"].numpy())
                lists[7].append((len(c.slots), cplx))
                state_tensors += [s[k] for k in ("step",) + _STATE_KEYS if s.get(k) is not None]
                c.slots.append(None)
        ngroups = max(len(self.param_groups), 1)
        for lists in per_dtype.values():
            plan = _core._Plan(RULE_ADAM, ADAM_STATE, lists[0],
                               list(zip(lists[1], lists[2], lists[3])), None, lists[4],
                               ngroups, labels=lists[5], step_mirrors=lists[6])
            pi = len(c.plans)
            for bi, (pos, cplx) in enumerate(lists[7]):
                c.slots[pos] = (pi, bi, cplx)
            c.plans.append(plan)
        # Everything is checked: install the new and completed state (undone by _undo
        # if the step that asked for it is refused).
        undo = []
        for p, new, updates in pending:
            if new is not None:
                self.state[p] = new
                undo.append((p, None, new["step"]))
            else:
                undo.append((p, {k: self.state[p].get(k, _MISSING) for k in updates},
                             updates.get("step", self.state[p]["step"])))
                self.state[p].update(updates)
        undo = [(p, old, step, float(step)) for p, old, step in undo]
        c.tensors += state_tensors
        c.ptrs = list(map(_data_ptr, c.tensors))
        c.storages = [t.untyped_storage() for t in c.tensors]
        c.amsgrad = tuple(bool(g["amsgrad"]) for g in self.param_groups)
        c.state = self.state
        c.state_ids, c.inner_ids = _state_ids(self.state)
        self._cache = c
        self._applied = None
        return undo

    def _undo(self, undo):
        """Take back the state a rebuild installed (a refused step creates none) -- unless
        the C pass ran (an exception raised just after it, a KeyboardInterrupt say): then
        the state is what the buffers were updated with, and stays."""
        if any(float(step) != before for _, _, step, before in undo):
            return
        for p, old, _, _ in reversed(undo):
            if old is None:
                self.state.pop(p, None)
            else:
                for k, v in old.items():
                    if v is _MISSING:
                        self.state[p].pop(k, None)
                    else:
                        self.state[p][k] = v
        self._cache = None

    def _collect(self):
        """(per-plan gradient lists of NumPy views or None, any active) from the .grad
        tensors, or None if the plans must be rebuilt first (a parameter's first
        gradient, a parameter, its data or a state entry replaced, ...)."""
        c = self._cache
        flat = [p for g in self.param_groups for p in g["params"]]
        state = self.state
        if (list(map(id, flat)) != c.ids or state is not c.state
                or list(map(_data_ptr, c.tensors)) != c.ptrs
                or _state_ids(state) != (c.state_ids, c.inner_ids)):
            return None
        grads = [[None] * len(plan) for plan in c.plans]
        active = False
        for slot, g in zip(c.slots, map(_grad_of, flat)):
            if g is None:
                continue
            if slot is None:
                return None  # first gradient of this parameter: create its state
            if g.layout is not _STRIDED:
                raise _SparseGradientError("Adam does not support sparse gradients, please "
                                           "consider SparseAdam instead")
            if g.is_conj():
                g = g.resolve_conj()  # read only: a copy of a lazily conjugated view
            if g.is_neg():
                g = g.resolve_neg()
            if not g.is_contiguous():
                g = g.contiguous()  # read only; a copy only for odd layouts
            if slot[2]:
                if not g.is_complex():
                    raise TypeError(f"the gradient of a complex parameter must be complex, "
                                    f"got {_describe(g)}")
                g = _torch.view_as_real(g)
            try:
                grads[slot[0]][slot[1]] = g.numpy()
            except RuntimeError:  # a gradient that requires grad (create_graph=True)
                grads[slot[0]][slot[1]] = g.detach().numpy()
            active = True
        return grads, active

    def _apply(self, keys):
        options = [self._options_of(g) for g in self.param_groups]
        for plan in self._cache.plans:
            for gi, o in enumerate(options):
                plan.set_options(gi, *adam_plan_options(o))
        self._applied = keys

    # --------------------------------------------------------------------- step
    def step(self, closure=None, grad_scale=None, found_inf=None):
        """One Adam step for every parameter whose ``.grad`` is not None.

        closure: re-evaluates the model and returns the loss (run with grad enabled).
        grad_scale: a number or 1-element tensor every gradient is divided by, inside the
            kernel (loss scaling); default: the ``grad_scale`` attribute that
            ``torch.amp.GradScaler.step`` sets, else 1.
        found_inf: a number or 1-element tensor; if nonzero nothing changes (parameters,
            moments, step counts); default: the ``found_inf`` attribute GradScaler sets.
        Returns the closure's loss (or None).
        """
        loss = None
        if closure is not None:
            with _torch.enable_grad():
                loss = closure()
        with self._lock:
            self._step(grad_scale, found_inf)
        return loss

    def _step(self, grad_scale, found_inf):
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _number("found_inf", found_inf) != 0:
            return
        scale = 1.0
        if grad_scale is not None:
            scale = check_grad_scale(_number("grad_scale", grad_scale))
        threads = check_threads(self.num_threads)
        max_norm = check_max_norm(self.max_grad_norm) or 0.0

        groups = self.param_groups
        try:
            keys = [(_scalar(g["lr"]), tuple(map(_scalar, g["betas"])), _scalar(g["eps"]),
                     _scalar(g["weight_decay"]), g["amsgrad"], g["maximize"],
                     g["decoupled_weight_decay"]) for g in groups]
        except KeyError as e:
            raise ValueError(f"a param group lacks the option {e.args[0]!r}") from None
        if changed(keys, self._applied):
            for g in groups:  # before any state is made
                self._options_of(g)
        undo = []
        try:
            c = self._cache
            if c is None or c.amsgrad != tuple(bool(k[4]) for k in keys):
                undo += self._rebuild(init=True)
            for attempt in range(2):
                collected = self._collect()
                if collected is None:
                    undo += self._rebuild(init=True)
                    collected = self._collect()
                    if collected is None:  # pragma: no cover - the rebuild covers every trigger
                        raise RuntimeError("fastadam.torch: could not build the optimizer plan")
                all_grads, active = collected
                if changed(keys, self._applied):
                    self._apply(keys)
                c = self._cache
                if not active:
                    return
                try:
                    _, self.last_grad_norm = _core.step_plans(c.plans, all_grads, threads,
                                                              scale, False, max_norm)
                    return
                except ValueError:
                    # p.data replaced by a tensor of another shape at the same address: the
                    # gradients no longer fit the plans. Rebuild once and check again.
                    if attempt or list(map(_shape_of, c.tensors[:len(c.ids)])) == c.shapes:
                        raise
                    self._cache = None
                    undo += self._rebuild(init=True)
        except BaseException:
            if undo:
                self._undo(undo)
            raise


def _step_value(step, where):
    """The count in state['step'] as a float, if torch's Adam could step from it and
    fastadam will: a number or 1-element tensor, >= 0 (inf included), not NaN."""
    if isinstance(step, _Tensor):
        if step.numel() != 1 or step.is_complex() or step.device.type != "cpu" \
                or step.layout is not _STRIDED:
            raise ValueError(f"state['step'] of {where} must be a number or a 1-element "
                             f"real dense CPU tensor, got {_describe(step)}")
        value = step.item()
    elif isinstance(step, (numbers.Real, np.generic)) and not isinstance(step, (bool, np.bool_)):
        value = step
    else:
        raise TypeError(f"state['step'] of {where} must be a number or a 1-element tensor, "
                        f"got {type(step).__name__}")
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"state['step'] of {where} must be a real number, got {step!r}") from None
    if not value >= 0.0:
        raise ValueError(f"state['step'] of {where} must be >= 0, got {value}")
    return value


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter) as ``torch.optim.AdamW``: decoupled weight decay,
    ``weight_decay`` defaults to 1e-2. Everything else as :class:`Adam`."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None, num_threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, max_grad_norm=max_grad_norm,
                         num_threads=num_threads)
