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

import math
import operator

import torch as _torch
from torch.optim import Optimizer as _Optimizer

from fastadam import _core
from fastadam._options import (check_grad_scale, check_max_norm, check_options, check_threads,
                               clip_coefficient)

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


def _view(t):
    """Zero-copy NumPy view of a CPU tensor's memory (complex viewed as real)."""
    if t.requires_grad:
        t = t.detach()
    if t.is_complex():
        t = _torch.view_as_real(t)
    return t.numpy()


class _Slot:
    """One parameter that has optimizer state, and where the plan keeps it."""

    __slots__ = ("plan", "block", "step_view", "complex")

    def __init__(self, plan, block, step, complex_):
        self.plan, self.block, self.complex = plan, block, complex_
        self.step_view = step.numpy()  # 0-d, shares the memory of state['step']


class _Cache:
    """The plans of one optimizer and what they were built from. A step reuses them
    while every parameter, its data pointer and every state entry is still the same
    object; it checks that with identity comparisons only (no tensor hashing)."""

    __slots__ = ("ids", "ptrs", "slots", "plans", "amsgrad", "state", "state_ids",
                 "inner_ids")

    def __init__(self):
        self.ids = []        # id() of every parameter, in param-group order
        self.ptrs = []       # its data_ptr() when the plans were built
        self.slots = []      # _Slot, or None for a parameter without state (no grad yet)
        self.plans = []      # one _core._Plan per element dtype
        self.amsgrad = ()    # each group's amsgrad flag when built
        self.state = None    # the optimizer's state dict object
        self.state_ids = []  # id() of each per-parameter state dict, in order
        self.inner_ids = []  # id() of every value in them (the state tensors), in order


_grad_of = operator.attrgetter("grad")
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
            default, ``OMP_NUM_THREADS``). The result is the same bits for every value.

    ``step(closure=None, grad_scale=None, found_inf=None)``: ``grad_scale`` (a number or
    0-dim tensor) divides every gradient inside the kernel; if ``found_inf`` is nonzero the
    step changes nothing (parameters, moments and step counts). ``torch.amp.GradScaler``
    passes both through its fused-optimizer protocol (``_step_supports_amp_scaling``), so
    ``scaler.step(opt)`` needs no separate unscale pass.

    ``state[p]['step']`` is a 0-dim float32 tensor as in torch and is the step count
    fastadam uses (read back if changed in place); like torch's it stops growing at 2**24.
    """

    _step_supports_amp_scaling = True
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, num_threads=None):
        name = type(self).__name__
        if capturable:
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support capturable=True (CUDA graph "
                f"capture); it updates CPU tensors. Use torch.optim.{name} for that.")
        if differentiable:
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support differentiable=True: the step runs "
                f"in C, outside autograd. Use torch.optim.{name} to differentiate through it.")
        if isinstance(lr, _Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        try:
            beta_pair = tuple(betas)
            assert len(beta_pair) == 2
        except Exception:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
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
        if (isinstance(param_group, dict) and "params" in param_group
                and not isinstance(param_group["params"], set)):
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

    # -------------------------------------------------------------------- plans
    @staticmethod
    def _options_of(group):
        """The group's hyperparameters, checked, as _Plan.set_options takes them."""
        b = group["betas"]
        try:
            b1, b2 = b
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {b!r}") from None
        return check_options(_scalar(group["lr"]), (_scalar(b1), _scalar(b2)),
                             _scalar(group["eps"]), _scalar(group["weight_decay"]),
                             group["decoupled_weight_decay"], group["amsgrad"],
                             group["maximize"], True, "paper")

    def _new_state(self, p, amsgrad):
        s = {"step": _torch.tensor(0.0, dtype=_step_dtype()),
             "exp_avg": _torch.zeros_like(p, memory_format=_torch.preserve_format),
             "exp_avg_sq": _torch.zeros_like(p, memory_format=_torch.preserve_format)}
        if amsgrad:
            s["max_exp_avg_sq"] = _torch.zeros_like(p, memory_format=_torch.preserve_format)
        return s

    def _check_state(self, p, s, amsgrad, where):
        """Make s usable by the plan: complete it (max_exp_avg_sq when amsgrad was switched
        on; a tensor step) and check every tensor."""
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in s]
        if missing:
            raise ValueError(f"state of {where} lacks {missing}")
        if amsgrad and s.get("max_exp_avg_sq") is None:
            # amsgrad switched on after the state was made: start the maximum at zero
            s["max_exp_avg_sq"] = _torch.zeros_like(p, memory_format=_torch.preserve_format)
        step = s["step"]
        if not isinstance(step, _Tensor):
            s["step"] = _torch.tensor(float(step), dtype=_step_dtype())
        elif (step.numel() != 1 or step.device.type != "cpu" or step.requires_grad
              or not step.is_floating_point()):
            s["step"] = _torch.tensor(float(step.item()), dtype=_step_dtype())
        elif step.dim() != 0:
            s["step"] = step.reshape(())
        steps = s["step"].item()
        if not (steps >= 0 and steps == math.floor(steps)):
            raise ValueError(f"state['step'] of {where} must be a whole number >= 0, got {steps}")
        for k in _STATE_KEYS:
            t = s.get(k)
            if t is None:
                continue
            if not isinstance(t, _Tensor):
                raise TypeError(f"state[{k!r}] of {where} must be a tensor, got "
                                f"{type(t).__name__}")
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"state[{k!r}] of {where} is {_describe(t)}; it must match "
                                 f"the parameter, {_describe(p)}")
            if t.layout is not _STRIDED or not t.is_contiguous():
                s[k] = t.contiguous()  # a (rare) copy, kept as the state from now on

    def _rebuild(self, init):
        """(Re)build the plans from the parameters and their state tensors.

        init: also create the state of parameters that have a grad and no state yet
        (torch's lazy initialisation at their first step)."""
        c = _Cache()
        per_dtype = {}  # plan dtype -> (params, m, v, vmax, groups, slot args)
        for gi, group in enumerate(self.param_groups):
            amsgrad = bool(group["amsgrad"])
            for i, p in enumerate(group["params"]):
                where = f"param group {gi}, parameter {i}"
                _check_param(p, where)
                c.ids.append(id(p))
                c.ptrs.append(p.data_ptr())
                s = self.state.get(p)
                if not s:
                    if not init or p.grad is None:
                        c.slots.append(None)
                        continue
                    s = self.state[p] = self._new_state(p, amsgrad)
                self._check_state(p, s, amsgrad, where)
                key, cplx = _SUPPORTED[p.dtype]
                lists = per_dtype.setdefault(key, ([], [], [], [], [], []))
                lists[0].append(_view(p))
                lists[1].append(_view(s["exp_avg"]))
                lists[2].append(_view(s["exp_avg_sq"]))
                vmax = s.get("max_exp_avg_sq")
                lists[3].append(None if vmax is None else _view(vmax))
                lists[4].append(gi)
                lists[5].append((len(c.slots), s, cplx))
                c.slots.append(None)
        ngroups = max(len(self.param_groups), 1)
        for lists in per_dtype.values():
            plan = _core._Plan(lists[0], lists[1], lists[2], lists[3], lists[4], ngroups)
            pi = len(c.plans)
            for bi, (pos, s, cplx) in enumerate(lists[5]):
                slot = c.slots[pos] = _Slot(pi, bi, s["step"], cplx)
                plan.set_step(bi, int(slot.step_view.item()))
            c.plans.append(plan)
        c.amsgrad = tuple(bool(g["amsgrad"]) for g in self.param_groups)
        c.state = self.state
        c.state_ids, c.inner_ids = _state_ids(self.state)
        self._cache = c
        self._applied = None

    def _collect(self):
        """(per-plan gradient lists of NumPy views or None, the active slots) from the
        .grad tensors, or None if the plans must be rebuilt first (a parameter's first
        gradient, a parameter, its data or a state entry replaced, ...)."""
        c = self._cache
        flat = [p for g in self.param_groups for p in g["params"]]
        state = self.state
        if (list(map(id, flat)) != c.ids or state is not c.state
                or list(map(_data_ptr, flat)) != c.ptrs
                or _state_ids(state) != (c.state_ids, c.inner_ids)):
            return None
        grads = [[None] * len(plan) for plan in c.plans]
        active = []
        for slot, g in zip(c.slots, map(_grad_of, flat)):
            if g is None:
                continue
            if slot is None:
                return None  # first gradient of this parameter: create its state
            if g.layout is not _STRIDED:
                raise RuntimeError("Adam does not support sparse gradients, please consider "
                                   "SparseAdam instead")
            if not g.is_contiguous():
                g = g.contiguous()  # read only; a copy only for odd layouts
            if slot.complex:
                g = _torch.view_as_real(g)
            try:
                grads[slot.plan][slot.block] = g.numpy()
            except RuntimeError:  # a gradient that requires grad (create_graph=True)
                grads[slot.plan][slot.block] = g.detach().numpy()
            active.append(slot)
        return grads, active

    def _apply(self, keys):
        options = [self._options_of(g) for g in self.param_groups]
        for plan in self._cache.plans:
            for gi, o in enumerate(options):
                plan.set_options(gi, *o)
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
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _scalar(found_inf) != 0:
            return loss
        scale = 1.0
        if grad_scale is not None:
            scale = check_grad_scale(_scalar(grad_scale))
        threads = check_threads(self.num_threads)
        max_norm = check_max_norm(self.max_grad_norm) or 0.0

        groups = self.param_groups
        keys = [(_scalar(g["lr"]), tuple(map(_scalar, g["betas"])), _scalar(g["eps"]),
                 _scalar(g["weight_decay"]), g["amsgrad"], g["maximize"],
                 g["decoupled_weight_decay"]) for g in groups]
        c = self._cache
        if c is None or c.amsgrad != tuple(bool(k[4]) for k in keys):
            self._rebuild(init=True)
        collected = self._collect()
        if collected is None:
            self._rebuild(init=True)
            collected = self._collect()
            if collected is None:  # pragma: no cover - the rebuild covers every trigger
                raise RuntimeError("fastadam.torch: could not build the optimizer plan")
        all_grads, active = collected
        if keys != self._applied:
            self._apply(keys)
        c = self._cache
        if not active:
            return loss

        # The state['step'] tensors are the truth (as in torch); resync the plan when
        # someone changed one in place.
        steps = [plan.get_steps() for plan in c.plans]
        for s in active:
            v = s.step_view.item()
            if v != steps[s.plan][s.block]:
                if not (v >= 0 and v == math.floor(v)):
                    raise ValueError(f"state['step'] must be a whole number >= 0, got {v}")
                c.plans[s.plan].set_step(s.block, int(v))

        if len(c.plans) == 1:
            _, self.last_grad_norm = c.plans[0].step(all_grads[0], threads, 0, -1, scale,
                                                     False, max_norm)
        else:
            self.last_grad_norm = None
            scales = [scale] * len(c.plans)
            if max_norm > 0.0:
                # One global norm across the dtypes: the same formula as _Plan.step.
                sumsq = 0.0
                for grads in all_grads:
                    present = [g for g in grads if g is not None]
                    if present:
                        sumsq += _core.grad_stats(present, threads)[0]
                norm = math.sqrt(sumsq) / scale if math.isfinite(sumsq) else sumsq
                coef = clip_coefficient(norm, max_norm)
                if coef < 1.0:
                    scales = [scale / coef if coef > 0 else math.inf] * len(c.plans)
                self.last_grad_norm = norm
            # (each plan checks all its input before writing; torch has already checked
            # every grad's dtype and shape, so the second cannot fail after the first ran)
            for plan, grads, sc in zip(c.plans, all_grads, scales):
                plan.step(grads, threads, 0, -1, sc, False, 0.0)

        steps = [plan.get_steps() for plan in c.plans]
        for s in active:
            s.step_view[()] = steps[s.plan][s.block]
        return loss


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
