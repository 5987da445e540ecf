"""The implementations compared in a cell: fastadam (one row per SIMD path), the NumPy
reference, an in-place NumPy Adam, torch.optim's for-loop, foreach and fused (Lion's torch
rows are written here), and the roofline (``fastadam._core.traffic_f32``).

The peers of ``--formats`` (DeepSpeed, bitsandbytes, the storage formats) are in
formats.py.
"""

from __future__ import annotations

import math

import numpy as np

from .rules import ADAM
from .workloads import BETAS, EPS, LR, _aligned, _array


def _step_scalars(t):
    b1, b2 = BETAS
    bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
    return b1, 1.0 - b1, b2, 1.0 - b2, EPS * math.sqrt(bc2), LR * math.sqrt(bc2) / bc1


def _torch_lion_class(torch):
    """Lion for torch (torch.optim has none), in the style of lucidrains' lion-pytorch
    (``lion_pytorch/lion_pytorch.py``, update_fn): per parameter,

        update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
        p.add_(update, alpha=-lr)
        exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)

    (lion-pytorch also runs p.mul_(1 - lr * wd) every step; with weight_decay=0 that is a
    no-op pass which this version skips, in torch's favour). ``foreach=True`` does the same
    with torch._foreach_* ops over all parameters (not in lion-pytorch; written here so that
    Lion has a multi-tensor torch peer as the other rules do)."""
    cached = getattr(_torch_lion_class, "cls", None)
    if cached is not None and cached[0] is torch:
        return cached[1]

    class TorchLion(torch.optim.Optimizer):
        def __init__(
            self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=False, fused=False
        ):
            if fused:
                raise TypeError("Lion has no fused torch implementation")
            super().__init__(
                params, dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach)
            )

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                beta1, beta2 = group["betas"]
                ps = [p for p in group["params"] if p.grad is not None]
                grads, avgs = [], []
                for p in ps:
                    st = self.state[p]
                    if not st:
                        st["exp_avg"] = torch.zeros_like(p)
                    grads.append(p.grad)
                    avgs.append(st["exp_avg"])
                if not ps:
                    continue
                if wd:
                    if group["foreach"]:
                        torch._foreach_mul_(ps, 1.0 - lr * wd)
                    else:
                        for p in ps:
                            p.mul_(1.0 - lr * wd)
                if group["foreach"]:
                    upd = torch._foreach_mul(avgs, beta1)
                    torch._foreach_add_(upd, grads, alpha=1.0 - beta1)
                    torch._foreach_sign_(upd)
                    torch._foreach_add_(ps, upd, alpha=-lr)
                    torch._foreach_mul_(avgs, beta2)
                    torch._foreach_add_(avgs, grads, alpha=1.0 - beta2)
                else:
                    for p, g, m in zip(ps, grads, avgs):
                        update = m.clone().mul_(beta1).add(g, alpha=1.0 - beta1).sign_()
                        p.add_(update, alpha=-lr)
                        m.mul_(beta2).add_(g, alpha=1.0 - beta2)
            return None

    _torch_lion_class.cls = (torch, TorchLion)
    return TorchLion


# ----------------------------------------------------------------------------- implementations
#
# Each implementation owns its parameters and moments (the gradients are shared, read only)
# and exposes `call = (fn, args)`: one step is fn(*args). `before_batch()` runs untimed.
# `mem_units` estimates its peak memory in units of n_elems * itemsize (for grouping).


class _Impl:
    key = label = ""
    thread_independent = False  # runs single-threaded whatever the thread count
    kind = "peer"
    prime_steps = 0  # untimed steps before the warm-up (see RuleSpec)

    def before_batch(self):
        pass


class FastAdam(_Impl):
    """fastadam.Adam.step(grads): one C call over all tensors. SIMD variants share one
    optimizer (and its state); before each batch the path is forced through opt._isa."""

    kind = "fastadam"

    def __init__(self, shared, isa_name, in_use):
        from .. import _core

        self.shared = shared
        self.isa_name = isa_name
        # the path in use runs as "auto" (-1): forcing a path makes the core re-check CPU
        # support on every call (CPUID, which traps on a VM: microseconds per step)
        self.isa = -1 if isa_name is None or in_use else _core.isa_index(isa_name)
        self.key = "fastadam" if isa_name is None else f"fastadam[{isa_name}]"
        self.label = self.key + (" *" if in_use and isa_name is not None else "")
        self.call = (shared.opt.step, (shared.grads,))
        self.prime_steps = shared.prime_steps
        self.offsets = sorted({a.ctypes.data % 64 for a in shared.params + shared.grads})

    @staticmethod
    def make_shared(wl, grads, dtype, threads, filler, rule=ADAM):
        from .. import optim

        class Shared:
            pass

        s = Shared()
        s.params = [filler.new(shape) for shape in wl.shapes]
        s.grads = grads
        s.opt = getattr(optim, rule.cls)(s.params, **rule.options, num_threads=threads)
        s.prime_steps = rule.prime_steps
        return s

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return rule.streams - 1  # params and state (the gradients are shared)

    def before_batch(self):
        self.shared.opt._isa = self.isa


class Roofline(_Impl):
    """fastadam._core.traffic_f32 over one flat buffer of the workload's size per stream
    (float64 buffers are viewed as twice as many float32: the same bytes), 64-byte aligned:
    the bound for the access pattern. As many streams as the rule touches (Adam: param,
    grad, m, v); each is read once and all but grad written once."""

    key, label, kind = "roofline", "roofline (traffic)", "roofline"

    def __init__(self, wl, grads, dtype, threads, filler, rule=ADAM):
        from .. import _core

        n = wl.n_elems
        k = np.dtype(dtype).itemsize // 4
        bufs = [filler.fill(_aligned((n,), dtype)) for _ in range(rule.streams)]
        views = [b.view(np.float32) for b in bufs]
        p, state, g = views[0], views[1:-1], views[-1]  # Adam: p, m, v, g as before
        assert p.size == k * n
        self._keep = (bufs, g)
        self.call = (_core.traffic_f32, ([p, g] + state, threads))

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return rule.streams


class Reference(_Impl):
    """fastadam.reference.<rule>_step (adam_step by default), tensor by tensor (the
    specification, plain NumPy)."""

    key, label = "reference", "NumPy reference"
    thread_independent = True

    def __init__(self, wl, grads, dtype, threads, filler, rule=ADAM):
        from .. import reference

        self.rule = rule
        self.prime_steps = rule.prime_steps
        self.step_fn = getattr(reference, rule.reference)
        self.options = rule.options
        a = filler.aligned
        k = rule.streams - 2
        self.views = [
            (filler.new(shape), g) + tuple(_array(shape, dtype, a) for _ in range(k))
            for shape, g in zip(wl.shapes, grads)
        ]
        self.mu = [1.0] * len(self.views)  # NAdam's per-parameter mu_product
        self.t = 0
        self.call = (self.step, ())

    def step(self):
        self.t += 1
        t, f = self.t, self.step_fn
        if self.rule is ADAM:
            for p, g, m, v in self.views:
                f(p, g, m, v, step=t, lr=LR, betas=BETAS, eps=EPS)
        elif self.rule.name == "nadam":
            for i, arrays in enumerate(self.views):
                self.mu[i] = f(*arrays, step=t, mu_product=self.mu[i], **self.options)
        else:
            for arrays in self.views:
                f(*arrays, step=t, **self.options)

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return (rule.streams - 1) + 2 * (rule.streams - 1) * wl.max_tensor / wl.n_elems


class NumpyInplace(_Impl):
    """Best-effort NumPy: ufuncs with out=, one preallocated scratch buffer, no temporaries:
    12 passes over memory per tensor and step. Bias corrections folded into two scalars:
    p -= [lr*sqrt(bc2)/bc1] * m / (sqrt(v) + eps*sqrt(bc2))."""

    key, label = "numpy", "NumPy in-place"
    thread_independent = True

    def __init__(self, wl, grads, dtype, threads, filler, rule=ADAM):
        assert rule is ADAM, "the in-place NumPy peer is Adam only"
        self.dt = np.dtype(dtype).type
        a = filler.aligned
        scratch = _array((wl.max_tensor,), dtype, a)
        self.views = []
        for shape, g, n in zip(wl.shapes, grads, wl.sizes):
            p = filler.new(shape)
            m, v = _array(shape, dtype, a), _array(shape, dtype, a)
            self.views.append(
                (p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), scratch[:n])
            )
        self.t = 0
        self.call = (self.step, ())

    def step(self):
        self.t += 1
        b1, c1, b2, c2, eps_hat, step = (self.dt(x) for x in _step_scalars(self.t))
        mul, add, sqrt, div, sub = np.multiply, np.add, np.sqrt, np.divide, np.subtract
        for p, g, m, v, s in self.views:
            mul(m, b1, out=m)
            mul(g, c1, out=s)
            add(m, s, out=m)  # m = b1*m + (1-b1)*g
            mul(v, b2, out=v)
            mul(g, g, out=s)
            mul(s, c2, out=s)
            add(v, s, out=v)  # v = b2*v + (1-b2)*g*g
            sqrt(v, out=s)
            add(s, eps_hat, out=s)
            div(m, s, out=s)
            mul(s, step, out=s)
            sub(p, s, out=p)

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return 3 + wl.max_tensor / wl.n_elems


class _Torch(_Impl):
    kwargs: dict = {}

    def __init__(self, wl, grads, dtype, threads, filler, rule=ADAM):
        import torch

        tdtype = {"float32": torch.float32, "float64": torch.float64}[np.dtype(dtype).name]
        self.params = []
        for shape, g in zip(wl.shapes, grads):
            p = torch.empty(shape, dtype=tdtype)
            filler.fill(p.numpy())
            p.requires_grad_(True)
            p.grad = torch.from_numpy(g)  # shared, read only
            self.params.append(p)
        if rule is ADAM:
            self.opt = torch.optim.Adam(self.params, lr=LR, betas=BETAS, eps=EPS, **self.kwargs)
        else:
            cls = (
                getattr(torch.optim, rule.torch_cls) if rule.torch_cls else _torch_lion_class(torch)
            )
            kw = dict(self.kwargs)
            if not rule.fused:  # torch.optim.RMSprop & co. take no fused argument
                kw.pop("fused", None)
            self.opt = cls(self.params, **rule.options, **kw)
        self.prime_steps = rule.prime_steps
        self.label = self.label_for(rule)
        self.threads = threads
        self.call = (self.opt.step, ())

    @classmethod
    def label_for(cls, rule):
        if rule.torch_cls == "":
            return cls.label + " (written here)"
        return cls.label


class TorchFused(_Torch):
    key, label = "torch_fused", "torch fused"
    kwargs = {"fused": True}

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return rule.streams - 1


class TorchForeach(_Torch):
    key, label = "torch_foreach", "torch foreach"
    kwargs = {"foreach": True, "fused": False}

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return 2 * (rule.streams - 1)


class TorchForloop(_Torch):
    key, label = "torch_forloop", "torch for-loop"
    kwargs = {"foreach": False, "fused": False}

    @staticmethod
    def mem_units(wl, rule=ADAM):
        return (rule.streams - 1) + 3 * wl.max_tensor / wl.n_elems


PEERS = {c.key: c for c in (Reference, NumpyInplace, TorchFused, TorchForeach, TorchForloop)}
IMPL_ORDER = ["fastadam", "torch_fused", "torch_foreach", "torch_forloop", "numpy", "reference"]
TORCH_IMPLS = {"torch_fused", "torch_foreach", "torch_forloop"}
# 5x..50x slower than the memory limit: skipped above --slow-limit elements by default
SLOW_IMPLS = ["torch_foreach", "torch_forloop", "numpy", "reference"]


# ----------------------------------------------------------------------------- torch


def _import_torch():
    try:
        import torch
    except Exception:
        return None
    return torch
