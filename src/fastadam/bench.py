"""``python -m fastadam bench``: time one optimizer step on this machine against its peers.

By default the rule is Adam (``--optimizer adam``); ``--optimizer sgd,adagrad,...`` or
``all`` measures the other rules of the family the same way (see RULE_SPECS for the options
each one runs with, and "Other rules" below).

What is measured, for every cell (dtype x thread count x workload):

* fastadam (``fastadam.Adam.step``, the Python call included; with ``--simd all`` one row
  per SIMD path usable here),
* the NumPy reference (``fastadam.reference.adam_step``, the specification),
* a best-effort in-place NumPy Adam (preallocated scratch, ``out=`` ufuncs, 12 passes),
* ``torch.optim.Adam`` for-loop, foreach and fused, when torch can be imported,
* the roofline: ``fastadam._core.traffic_f32``, the Adam memory-access pattern (read param,
  grad, m, v; write param, m, v) with no arithmetic, threaded like the step, over one flat
  buffer of the same size. Its time is the bound a memory-bound step cannot beat;
  "% roof" is roofline time / implementation time.

The implementations of one cell run interleaved: each is warmed up and calibrated (steps per
batch so that a batch lasts ``--batch-time``), then they are timed round-robin, one batch each
per round, the order rotating every round, so that all of them see the same state of the
machine (the memory bandwidth of a shared machine drifts over minutes). A cache-resident
step gets one untimed step before each batch, to re-warm the cache after the others ran.
The value reported is the median over batches of (batch time / steps), with the
interquartile range as the spread. Bandwidth counts 28 bytes per float32 element (56 per
float64 element) and step, whatever an implementation really moves.

Parameters and gradients are allocated by NumPy, as a user passes them (``--aligned``: 64-byte
aligned); torch allocates its own parameters; the roofline's buffers are 64-byte aligned.

Memory: the implementations of a cell are packed into groups whose buffers fit in
``--max-memory``; only one group is allocated at a time, and the roofline is re-measured in
every group (its % is relative to the roofline measured beside it).

Other rules (``--optimizer``): for each of SGD, Adagrad, RMSprop, Adamax, NAdam, RAdam and
Lion the cell holds fastadam's NumPy class (``fastadam.SGD`` ...), ``torch.optim``'s class
for-loop (``foreach=False``), foreach (``foreach=True``) and fused (``fused=True``, where
torch has a CPU kernel for the rule: SGD, Adagrad, Adam), the NumPy reference
(``fastadam.reference.<rule>_step``), and the rule's own roofline: ``traffic_f32`` over as
many streams as the rule touches (param, grad and its state streams), so that a rule with
one state stream is compared with 20 bytes per float32 element, not Adam's 28. Lion is not
in torch.optim: its torch rows are written here (a for-loop in the style of lucidrains'
lion-pytorch, and a foreach version), see _torch_lion_class. Without ``--sizes`` /
``--models`` those rules run the workloads of their targets only (1e6, 1e8 and 1000 x
1000; ``--quick``: Adam's quick set). The Adam rows are what they were without the flag.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
BYTES_PER_ELEM = {"float32": 28, "float64": 56}
SCHEMA = "fastadam-bench/1"
BUSY = 0.05   # other processes' share of all CPUs above which a cell is marked disturbed

# ----------------------------------------------------------------------------- workloads


def gpt2_small_shapes():
    """Parameter shapes of GPT-2 small (Hugging Face GPT2LMHeadModel; lm_head is tied to
    wte): 148 tensors, 124,439,808 parameters."""
    d, n_layer, vocab, n_ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (n_ctx, d)]                    # wte, wpe
    for _ in range(n_layer):
        shapes += [(d,), (d,),                           # ln_1 weight, bias
                   (d, 3 * d), (3 * d,),                 # attn.c_attn (Conv1D: in x out)
                   (d, d), (d,),                         # attn.c_proj
                   (d,), (d,),                           # ln_2
                   (d, 4 * d), (4 * d,),                 # mlp.c_fc
                   (4 * d, d), (d,)]                     # mlp.c_proj
    return shapes + [(d,), (d,)]                         # ln_f


def resnet50_shapes():
    """Parameter shapes of torchvision's resnet50 (Bottleneck blocks [3, 4, 6, 3]; BatchNorm
    weight and bias are parameters, running statistics are not): 161 tensors, 25,557,032
    parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]               # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:                                   # downsample: 1x1 conv + bn
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]              # fc


def many_small_shapes():
    """1000 tensors of 1000 elements: the cost per tensor."""
    return [(1000,)] * 1000


MODELS = {
    "gpt2_small": ("GPT-2 small", gpt2_small_shapes),
    "resnet50": ("ResNet-50", resnet50_shapes),
    "many_small": ("1000 x 1000", many_small_shapes),
}


class Workload:
    def __init__(self, name, label, shapes, kind):
        self.name, self.label, self.shapes, self.kind = name, label, list(shapes), kind
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.n_elems = sum(self.sizes)
        self.n_tensors = len(self.shapes)
        self.max_tensor = max(self.sizes)

    @classmethod
    def tensor(cls, n):
        return cls(f"n{_fmt_count(n)}", _fmt_count(n), [(n,)], "tensor")

    @classmethod
    def model(cls, name):
        label, fn = MODELS[name]
        w = cls(name, label, fn(), "model")
        if name != "many_small":
            w.label = f"{label} ({w.n_tensors} t, {w.n_elems / 1e6:.1f}M)"
        return w


def _fmt_count(n):
    """1000 -> '1e3', 2500 -> '2500', 3000000 -> '3e6'."""
    n = int(n)
    if n >= 1000:
        e = int(math.floor(math.log10(n)))
        for ee in (e, e - 1):
            mant = n / 10 ** ee
            if mant == int(mant) and mant < 10:
                return f"{int(mant)}e{ee}" if mant != 1 else f"1e{ee}"
    return str(n)


# ----------------------------------------------------------------------------- buffers


def _aligned(shape, dtype):
    from .optim import aligned_zeros

    return aligned_zeros(shape, dtype)


def _array(shape, dtype, aligned):
    """A zeroed array as a user would pass it (NumPy's own allocation: on Linux usually 16-byte
    aligned, not 64), or 64-byte aligned with ``aligned``."""
    return _aligned(shape, dtype) if aligned else np.zeros(shape, dtype)


class _Filler:
    """Fills arrays quickly with a tiled random pattern (a different phase per array);
    ``new(shape)`` allocates (aligned or as NumPy does, see _array) and fills."""

    TILE = 1 << 16

    def __init__(self, dtype, scale, seed, aligned=False):
        self.dtype, self.aligned = dtype, aligned
        rng = np.random.default_rng(seed)
        t = (rng.standard_normal(self.TILE) * scale).astype(dtype)
        self.tile2 = np.concatenate([t, t])
        self.k = 0

    def new(self, shape):
        return self.fill(_array(shape, self.dtype, self.aligned))

    def fill(self, a):
        flat = a.reshape(-1)
        T = self.TILE
        o = (self.k * 7919) % T
        self.k += 1
        pat = self.tile2[o:o + T]
        n = flat.size
        head = n // T * T
        if head:
            flat[:head].reshape(-1, T)[...] = pat
        flat[head:] = pat[:n - head]
        return a


def _step_scalars(t):
    b1, b2 = BETAS
    bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
    return b1, 1.0 - b1, b2, 1.0 - b2, EPS * math.sqrt(bc2), LR * math.sqrt(bc2) / bc1


# ----------------------------------------------------------------------------- rules


class RuleSpec:
    """How one rule is benchmarked: fastadam's class and torch.optim's (same name, same
    options), the options both get (torch 2.13's defaults, except where a default would
    leave the rule without state: SGD runs with momentum=0.9), its memory streams
    (param, grad and the state streams the options need) and its NumPy reference."""

    def __init__(self, name, cls, options, streams, *, fused=False, note="",
                 prime_steps=0, torch_cls=None):
        self.name, self.cls, self.options, self.streams = name, cls, dict(options), streams
        self.fused = fused            # torch 2.13 has fused=True for it on the CPU
        self.note = note
        self.prime_steps = prime_steps  # untimed steps before the warm-up (RAdam: rho_t > 5)
        self.torch_cls = cls if torch_cls is None else torch_cls  # "" = not in torch.optim
        self.reference = f"{name}_step"

    @property
    def title(self):
        return self.cls

    def bytes_per_elem(self, dtype):
        """Each stream read once, each but grad written once."""
        return (2 * self.streams - 1) * np.dtype(dtype).itemsize

    def options_text(self):
        return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}"
                         for k, v in self.options.items())

    def as_json(self):
        return {"class": self.cls, "options": self.options, "streams": self.streams,
                "bytes_per_elem_float32": self.bytes_per_elem("float32"),
                "torch_class": self.torch_cls or None, "torch_fused": self.fused,
                "reference": f"fastadam.reference.{self.reference}", "note": self.note}


_B = BETAS
RULE_SPECS = {s.name: s for s in (
    RuleSpec("adam", "Adam", dict(lr=LR, betas=BETAS, eps=EPS), 4, fused=True),
    RuleSpec("sgd", "SGD", dict(lr=1e-3, momentum=0.9), 3, fused=True,
             note="momentum=0.9 (torch's default 0 keeps no state)"),
    RuleSpec("adagrad", "Adagrad", dict(lr=1e-2, eps=1e-10), 3, fused=True),
    RuleSpec("rmsprop", "RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), 3),
    RuleSpec("adamax", "Adamax", dict(lr=2e-3, betas=_B, eps=1e-8), 4),
    RuleSpec("nadam", "NAdam", dict(lr=2e-3, betas=_B, eps=1e-8, momentum_decay=4e-3), 4),
    RuleSpec("radam", "RAdam", dict(lr=1e-3, betas=_B, eps=1e-8), 4, prime_steps=6,
             note="6 untimed steps first: from step 6 on (rho_t > 5) the rectified Adam "
                  "update runs, the steady state"),
    RuleSpec("lion", "Lion", dict(lr=1e-4, betas=(0.9, 0.99)), 3, torch_cls="",
             note="not in torch.optim: the torch rows are written here (for-loop in the "
                  "style of lucidrains' lion-pytorch, and a foreach version)"),
)}
RULE_ORDER = list(RULE_SPECS)
ADAM = RULE_SPECS["adam"]
# the workloads of the targets, for rules other than Adam when --sizes / --models are not given
RULE_SIZES, RULE_MODELS = [10 ** 6, 10 ** 8], ["many_small"]


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
        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                     foreach=False, fused=False):
            if fused:
                raise TypeError("Lion has no fused torch implementation")
            super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                          foreach=foreach))

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
    thread_independent = False   # runs single-threaded whatever the thread count
    kind = "peer"
    prime_steps = 0              # untimed steps before the warm-up (see RuleSpec)

    def before_batch(self):
        pass


class FastAdam(_Impl):
    """fastadam.Adam.step(grads): one C call over all tensors. SIMD variants share one
    optimizer (and its state); before each batch the path is forced through opt._isa."""

    kind = "fastadam"

    def __init__(self, shared, isa_name, in_use):
        from . import _core

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
        from . import optim

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
        return rule.streams - 1          # params and state (the gradients are shared)

    def before_batch(self):
        self.shared.opt._isa = self.isa


class Roofline(_Impl):
    """fastadam._core.traffic_f32 over one flat buffer of the workload's size per stream
    (float64 buffers are viewed as twice as many float32: the same bytes), 64-byte aligned:
    the bound for the access pattern. As many streams as the rule touches (Adam: param,
    grad, m, v); each is read once and all but grad written once."""

    key, label, kind = "roofline", "roofline (traffic)", "roofline"

    def __init__(self, wl, grads, dtype, threads, filler, rule=ADAM):
        from . import _core

        n = wl.n_elems
        k = np.dtype(dtype).itemsize // 4
        bufs = [filler.fill(_aligned((n,), dtype)) for _ in range(rule.streams)]
        views = [b.view(np.float32) for b in bufs]
        p, state, g = views[0], views[1:-1], views[-1]     # Adam: p, m, v, g as before
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
        from . import reference

        self.rule = rule
        self.prime_steps = rule.prime_steps
        self.step_fn = getattr(reference, rule.reference)
        self.options = rule.options
        a = filler.aligned
        k = rule.streams - 2
        self.views = [(filler.new(shape), g) + tuple(_array(shape, dtype, a) for _ in range(k))
                      for shape, g in zip(wl.shapes, grads)]
        self.mu = [1.0] * len(self.views)       # NAdam's per-parameter mu_product
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
            self.views.append((p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                               scratch[:n]))
        self.t = 0
        self.call = (self.step, ())

    def step(self):
        self.t += 1
        b1, c1, b2, c2, eps_hat, step = (self.dt(x) for x in _step_scalars(self.t))
        mul, add, sqrt, div, sub = np.multiply, np.add, np.sqrt, np.divide, np.subtract
        for p, g, m, v, s in self.views:
            mul(m, b1, out=m)
            mul(g, c1, out=s)
            add(m, s, out=m)          # m = b1*m + (1-b1)*g
            mul(v, b2, out=v)
            mul(g, g, out=s)
            mul(s, c2, out=s)
            add(v, s, out=v)          # v = b2*v + (1-b2)*g*g
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
            p.grad = torch.from_numpy(g)          # shared, read only
            self.params.append(p)
        if rule is ADAM:
            self.opt = torch.optim.Adam(self.params, lr=LR, betas=BETAS, eps=EPS,
                                        **self.kwargs)
        else:
            cls = (getattr(torch.optim, rule.torch_cls) if rule.torch_cls
                   else _torch_lion_class(torch))
            kw = dict(self.kwargs)
            if not rule.fused:       # torch.optim.RMSprop & co. take no fused argument
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
IMPL_ORDER = ["fastadam", "torch_fused", "torch_foreach", "torch_forloop", "numpy",
              "reference"]
TORCH_IMPLS = {"torch_fused", "torch_foreach", "torch_forloop"}
# 5x..50x slower than the memory limit: skipped above --slow-limit elements by default
SLOW_IMPLS = ["torch_foreach", "torch_forloop", "numpy", "reference"]


# ----------------------------------------------------------------------------- timing


class Progress:
    """One status line on stderr (rewritten in place on a terminal; one line per cell
    otherwise)."""

    def __init__(self, total, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.enabled = total, enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.i = 0
        self.cell = ""
        self._last = 0.0
        self._width = 0

    def start_cell(self, text):
        self.i += 1
        self.cell = text
        if self.enabled and not self.tty:
            print(f"[{self.i:>3}/{self.total}] {self._elapsed()} {text}", file=self.stream,
                  flush=True)
        self.update("")

    def _elapsed(self):
        return f"{time.perf_counter() - self.t0:6.1f}s"

    def update(self, what, force=False):
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        line = f"[{self.i:>3}/{self.total}] {self._elapsed()} {self.cell}  {what}"
        line = line[:150]
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        if self.enabled:
            print(f"done in {time.perf_counter() - self.t0:.1f} s", file=self.stream,
                  flush=True)


def _quartiles(v):
    v = sorted(v)
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def measure_interleaved(impls, *, repeats, batch_time, warm_time, max_time, progress,
                        min_batches=3):
    """Warm up and calibrate every implementation, then time them round-robin.

    Returns {key: dict(samples=[seconds per step, one per batch], steps_per_batch=...,
    ...)} or {key: {"error": message}}."""
    perf = time.perf_counter
    out, cal = {}, {}
    for imp in impls:
        fn, args = imp.call
        progress.update(f"{imp.key}: warm-up")
        try:
            imp.before_batch()
            for _ in range(imp.prime_steps):
                fn(*args)
            fn(*args)                      # the first step may allocate state: untimed
            k, t0 = 0, perf()
            while True:
                fn(*args)
                k += 1
                el = perf() - t0
                if (k >= 2 and el >= warm_time) or el >= 0.2:
                    break
            one = el / k
        except Exception as e:
            out[imp.key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        reps = max(1, int(math.ceil(batch_time / max(one, 1e-9))))
        cal[imp.key] = dict(reps=reps, rewarm=one < 0.02, warmup_steps=k + 1, spent=0.0,
                            samples=[], rounds=[])
    live = [imp for imp in impls if imp.key in cal]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            s = r % max(len(live), 1)
            for imp in live[s:] + live[:s]:
                c = cal[imp.key]
                if imp.key in out or c.get("stop"):
                    continue
                progress.update(f"{imp.key}: batch {r + 1}/{repeats}")
                fn, args = imp.call
                rng = range(c["reps"])
                try:
                    imp.before_batch()
                    if c["rewarm"]:
                        fn(*args)
                    t0 = perf()
                    for _ in rng:
                        fn(*args)
                    dt = perf() - t0
                except Exception as e:
                    out[imp.key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                    continue
                c["samples"].append(dt / c["reps"])
                c["rounds"].append(r)
                c["spent"] += dt
                if c["spent"] > max_time and len(c["samples"]) >= min_batches:
                    c["stop"] = True
    finally:
        if was_enabled:
            gc.enable()
    for key, c in cal.items():
        if key not in out:
            out[key] = {"samples": c["samples"], "rounds": c["rounds"],
                        "steps_per_batch": c["reps"],
                        "warmup_steps": c["warmup_steps"], "rewarm": c["rewarm"],
                        "capped": bool(c.get("stop")) and len(c["samples"]) < repeats}
    return out


# ----------------------------------------------------------------------------- machine


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info():
    info = {"platform": platform.platform(), "machine": platform.machine(),
            "logical_cpus": os.cpu_count()}
    cpuinfo = _read("/proc/cpuinfo")
    model, phys = None, set()
    cur = {}
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if "physical id" in cur and "core id" in cur:
                phys.add((cur["physical id"], cur["core id"]))
            cur = {}
            continue
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        cur[k] = v
        if k in ("model name", "Model", "cpu model") and model is None:
            model = v
    info["cpu_model"] = model or platform.processor() or "unknown"
    info["physical_cores"] = len(phys) or None
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["usable_cpus"] = os.cpu_count()
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(base):
        for d in sorted(os.listdir(base)):
            if d.startswith("index"):
                lvl = _read(f"{base}/{d}/level").strip()
                typ = _read(f"{base}/{d}/type").strip()
                size = _read(f"{base}/{d}/size").strip()
                if lvl and size and typ != "Instruction":
                    caches[f"L{lvl}"] = size
    info["caches_per_cpu0"] = caches
    meminfo = _read("/proc/meminfo")
    for key, name in (("MemTotal", "mem_total_bytes"), ("MemAvailable", "mem_available_bytes")):
        for line in meminfo.splitlines():
            if line.startswith(key + ":"):
                info[name] = int(line.split()[1]) * 1024
    info["loadavg_start"] = _read("/proc/loadavg").strip()
    info["hypervisor"] = " hypervisor " in f" {cpuinfo.replace(chr(10), ' ')} "
    return info


class CpuMonitor:
    """How much CPU time *other* processes took while we measured (from /proc/stat and
    this process's own CPU time): a busy machine makes every timing unreliable, threaded
    ones most (an OpenMP team waits for its slowest, descheduled thread)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            v = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:9]]
        except (IndexError, ValueError):
            return None
        t = os.times()   # this process's threads and its finished children are ours
        return sum(v), v[3] + v[4], t[0] + t[1] + t[2] + t[3]

    def others(self, reset=True):
        """Fraction (0..1) of all CPUs' time used by other processes since the last call,
        or None where /proc/stat is not available."""
        now = self._sample()
        a, self.start = self.start, (now if reset else self.start)
        if now is None or a is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total = (now[0] - a[0]) / hz
        if total <= 0:
            return None
        busy = total - (now[1] - a[1]) / hz
        return min(1.0, max(0.0, (busy - (now[2] - a[2])) / total))


def _mem_available():
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def versions(torch_mod):
    import fastadam

    v = {"python": platform.python_version(), "numpy": np.__version__,
         "fastadam": fastadam.__version__, "fastadam_config": fastadam.config(),
         "torch": getattr(torch_mod, "__version__", None)}
    if torch_mod is not None:
        v["torch_num_threads_default"] = torch_mod.get_num_threads()
    for k in ("OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
              "FASTADAM_SIMD"):
        if os.environ.get(k) is not None:
            v.setdefault("environment", {})[k] = os.environ[k]
    return v


# ----------------------------------------------------------------------------- arguments


def _parse_list(s, conv, what):
    out = []
    for tok in str(s).split(","):
        tok = tok.strip()
        if tok:
            try:
                out.append(conv(tok))
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"{what}: cannot read {tok!r}") from None
    return out


def _size(tok):
    x = float(tok)
    if not (x >= 1 and x == int(x)):
        raise ValueError(tok)
    return int(x)


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m fastadam bench",
        description="Time one Adam step of fastadam against the NumPy reference, an in-place "
                    "NumPy Adam and torch.optim.Adam (when installed), interleaved, with the "
                    "memory roofline of this machine for the Adam access pattern; "
                    "--optimizer does the same for SGD, Adagrad, RMSprop, Adamax, NAdam, "
                    "RAdam and Lion.",
        epilog="examples:\n"
               "  %(prog)s                  # the default (about a minute on 2 cores)\n"
               "  %(prog)s --optimizer all  # every rule (Adam's sweep + 1e6, 1e8, 1000 x 1000)\n"
               "  %(prog)s --sizes 1e3,1e6 --models none --threads 1\n"
               "  %(prog)s --dtype float32,float64 --simd all --threads all\n"
               "  %(prog)s --json out.json --plot out.png\n"
               "  %(prog)s --load out.json --plot out.png   # re-print / re-plot a run\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="single-tensor sizes, comma separated (default 1e3,1e4,1e5,1e6,1e7,1e8; "
                        "'none' for no single tensors)")
    p.add_argument("--models", default=None,
                   help="model-shaped workloads: gpt2_small, resnet50, many_small (1000 tensors "
                        "x 1000), 'all' or 'none' (default all)")
    p.add_argument("--dtype", default=None, help="float32, float64 or both (default float32)")
    p.add_argument("--threads", default=None,
                   help="thread counts, comma separated; 'max' = OpenMP's maximum, 'all' = "
                        "1..max (default 1,max)")
    p.add_argument("--simd", default=None,
                   help="fastadam SIMD paths: 'auto' (the one in use, default), 'all' (every "
                        "path usable here, one row each) or a list such as sse2,avx2")
    p.add_argument("--optimizer", default=None, metavar="LIST",
                   help="update rules, comma separated: " + ", ".join(RULE_ORDER) +
                        " or 'all' (default adam). Each runs fastadam's class, torch.optim's "
                        "for-loop, foreach and (SGD, Adagrad, Adam) fused, the NumPy reference "
                        "and a roofline over the rule's own streams; without --sizes/--models "
                        "rules other than Adam run 1e6, 1e8 and 1000 x 1000 only")
    p.add_argument("--impls", default=None,
                   help="implementations besides the roofline: fastadam, reference, numpy, "
                        "torch (= torch_fused,torch_foreach,torch_forloop) or any of those "
                        "(default: all that can run)")
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline rows")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed batches per implementation and cell (default 7)")
    p.add_argument("--batch-time", type=float, default=None,
                   help="seconds per timed batch; sets the steps per batch (default 0.02)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds of timed batches per implementation and cell, after which a "
                        "slow implementation stops at >= 3 batches (default 1.5)")
    p.add_argument("--slow-limit", type=float, default=None,
                   help="run the slow implementations (torch for-loop and foreach, both NumPy "
                        "ones) only up to this many elements per workload, to keep the default "
                        "run short (default 3e7: 1e8 and GPT-2 small run fastadam, torch fused "
                        "and the roofline only; 0 = no limit)")
    p.add_argument("--numpy-all-threads", action="store_true",
                   help="measure the single-threaded NumPy implementations at every thread "
                        "count (default: at the first one only)")
    p.add_argument("--max-memory", type=float, default=None,
                   help="GiB the buffers of one group of implementations may take (default "
                        "min(6, 60%% of available memory))")
    p.add_argument("--aligned", action="store_true",
                   help="allocate parameters and gradients 64-byte aligned (default: as NumPy "
                        "allocates them, usually 16-byte aligned, as users pass them; torch "
                        "allocates its parameters itself, 64-byte aligned)")
    p.add_argument("--quick", action="store_true",
                   help="a few seconds: sizes 1e3,1e5, no models, 1 thread, 3 short batches")
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--load", metavar="PATH",
                   help="do not measure: print (and --plot) the results of an earlier --json")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--formats", nargs="?", const="all", default=None, metavar="LIST",
                   help="storage formats instead (docs/formats.md): fastadam's AdamW in "
                        "fp32, fp32 + 8-bit state, bf16 + bf16 state, bf16 + fp32 master (+ "
                        "8-bit state) against torch fused, DeepSpeed CPUAdam (fp32, bf16, its "
                        "engine path) and bitsandbytes' 8-bit AdamW where installed, with "
                        "each format's bytes and own roofline (default workloads 1e8 and "
                        "gpt2_small; --sizes shrinks them). LIST: rows (see bench_formats."
                        "DISPLAY_ORDER) or 'all' (the default)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


class Settings:
    pass


def _timing_settings(s, args, pick, q):
    """The roofline and timing options every bench mode shares (--no-roofline, --repeats,
    --batch-time, --max-time), with their defaults (quick: --quick's)."""
    s.roofline = not args.no_roofline
    s.repeats = pick(args.repeats, 7, 3)
    s.batch_time = pick(args.batch_time, 0.02, 0.004)
    s.max_time = pick(args.max_time, 1.5, 0.3)
    s.warm_time = min(0.05, max(s.batch_time, 0.002)) if not q else 0.004
    if s.repeats < 1 or s.batch_time <= 0 or s.max_time <= 0:
        raise SystemExit("--repeats, --batch-time and --max-time must be positive")


def resolve(args):
    """Defaults, --quick, and validation. Returns a Settings object (raises SystemExit)."""
    import fastadam

    cfg = fastadam.config()
    s = Settings()
    q = args.quick

    def pick(val, default, quick):
        return val if val is not None else (quick if q else default)

    sizes = pick(args.sizes, "1e3,1e4,1e5,1e6,1e7,1e8", "1e3,1e5")
    s.sizes = [] if sizes.strip().lower() == "none" else _parse_list(sizes, _size, "--sizes")
    models = pick(args.models, "all", "none").strip().lower()
    if models == "all":
        s.models = list(MODELS)
    elif models in ("none", ""):
        s.models = []
    else:
        s.models = _parse_list(models, str, "--models")
        s.models = ["gpt2_small" if m in ("gpt2", "gpt-2") else m for m in s.models]
        bad = [m for m in s.models if m not in MODELS]
        if bad:
            raise SystemExit(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    opt = (args.optimizer or "adam").strip().lower()
    if opt == "all":
        s.optimizers = list(RULE_ORDER)
    else:
        want = _parse_list(opt, str, "--optimizer")
        bad = [x for x in want if x not in RULE_SPECS]
        if bad or not want:
            raise SystemExit(f"--optimizer: unknown {bad}; choose from "
                             f"{', '.join(RULE_ORDER)} or all")
        s.optimizers = list(dict.fromkeys(want))
    # rules other than Adam: the workloads of their targets unless --sizes/--models say
    s.rule_sizes = s.sizes if (args.sizes is not None or q) else list(RULE_SIZES)
    s.rule_models = s.models if (args.models is not None or q) else list(RULE_MODELS)
    s.dtypes = _parse_list(pick(args.dtype, "float32", "float32"), str, "--dtype")
    bad = [d for d in s.dtypes if d not in BYTES_PER_ELEM]
    if bad:
        raise SystemExit(f"--dtype: unknown {bad}; choose float32 and/or float64")
    maxt = cfg["max_threads"] if cfg["openmp"] else 1
    th = pick(args.threads, "1,max", "1").strip().lower()
    if th == "all":
        s.threads = list(range(1, maxt + 1))
    else:
        s.threads = _parse_list(th, lambda t: maxt if t == "max" else int(t), "--threads")
    if any(t < 1 for t in s.threads):
        raise SystemExit("--threads: thread counts must be >= 1")
    s.threads = list(dict.fromkeys(s.threads))
    avail = cfg["simd_available"]
    simd = pick(args.simd, "auto", "auto").strip().lower()
    if simd == "auto":
        s.simd = [None]
    elif simd == "all":
        s.simd = list(avail)
    else:
        s.simd = _parse_list(simd, str, "--simd")
        bad = [x for x in s.simd if x not in avail]
        if bad:
            raise SystemExit(f"--simd: {bad} not usable here; usable: {', '.join(avail)}")
    s.simd_in_use = cfg["simd"]
    impls = pick(args.impls, "all", "all").strip().lower()
    if impls == "all":
        s.impls = list(IMPL_ORDER)
    else:
        want = []
        for x in _parse_list(impls, str, "--impls"):
            want += sorted(TORCH_IMPLS) if x == "torch" else [x]
        bad = [x for x in want if x not in IMPL_ORDER]
        if bad:
            raise SystemExit(f"--impls: unknown {bad}; choose from "
                             f"{', '.join(IMPL_ORDER + ['torch'])}")
        s.impls = [x for x in IMPL_ORDER if x in want]
    _timing_settings(s, args, pick, q)
    s.slow_limit = pick(args.slow_limit, 3e7, 3e7)
    s.numpy_all_threads = args.numpy_all_threads
    avail_mem = _mem_available()
    gib = args.max_memory if args.max_memory is not None else min(6.0, 0.6 * avail_mem / 2**30)
    s.max_memory = int(gib * 2**30)
    s.quick = q
    s.aligned = args.aligned
    s.seed = args.seed
    return s


# ----------------------------------------------------------------------------- running


def _plan_groups(entries, budget, shared_bytes):
    """Pack (key, bytes) entries into groups that fit in budget; the roofline (if any) goes
    into every group. Entries that do not fit even alone are returned separately."""
    roof = [e for e in entries if e[0] == "roofline"]
    rest = [e for e in entries if e[0] != "roofline"]
    base = shared_bytes + sum(b for _, b in roof)
    groups, cur, used, too_big = [], [], base, []
    for key, b in rest:
        if base + b > budget:
            too_big.append(key)
            continue
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], base
        cur.append(key)
        used += b
    if cur or not groups:
        groups.append(cur)
    return [[k for k, _ in roof] + g for g in groups], too_big


def run(s, torch_mod, progress_enabled=True, log=None):
    """Measure every cell; returns the list of result records and the notes."""
    optimizers = getattr(s, "optimizers", ["adam"])
    by_rule = {}
    for name in optimizers:
        sizes, models = ((s.sizes, s.models) if name == "adam" else
                         (getattr(s, "rule_sizes", s.sizes), getattr(s, "rule_models", s.models)))
        by_rule[name] = [Workload.tensor(n) for n in sizes] + [Workload.model(m) for m in models]
    workloads = [w for ws in by_rule.values() for w in ws]
    records, notes = [], []
    torch_threads0 = torch_mod.get_num_threads() if torch_mod is not None else None
    impls = list(s.impls)
    if torch_mod is None and any(i in TORCH_IMPLS for i in impls):
        notes.append("torch is not importable here: the torch.optim.Adam rows are skipped "
                     "(pip install torch to compare)")
        impls = [i for i in impls if i not in TORCH_IMPLS]
    slow = [k for k in SLOW_IMPLS if k in impls]
    if s.slow_limit and slow and any(w.n_elems > s.slow_limit for w in workloads):
        notes.append(f"{', '.join(_label_of(k) for k in slow)}: skipped above "
                     f"{_fmt_count(s.slow_limit)} elements to keep the run short "
                     f"(--slow-limit 0 to include them)")
    if not s.numpy_all_threads and len(s.threads) > 1 and ({"numpy", "reference"} & set(impls)):
        notes.append(f"the NumPy implementations are single-threaded: measured at "
                     f"{s.threads[0]} thread(s) only (--numpy-all-threads to repeat them)")
    others = [RULE_SPECS[o] for o in optimizers if o != "adam"]
    if others and "numpy" in impls:
        notes.append("NumPy in-place: Adam only (the other rules have the NumPy reference)")
    if others and torch_mod is not None and any(i in TORCH_IMPLS for i in impls):
        nofused = [r.title for r in others if not r.fused]
        if nofused:
            notes.append(f"torch fused: torch {torch_mod.__version__} has no fused CPU kernel "
                         f"for {', '.join(nofused)}")
        for r in others:
            notes.append(f"{r.title}: {r.options_text()}; {r.streams} streams, "
                         f"{r.bytes_per_elem('float32')} B/element (float32)"
                         + (f"; {r.note}" if r.note else ""))
    cells = [(RULE_SPECS[o], d, t, w) for o in optimizers for d in s.dtypes
             for t in s.threads for w in by_rule[o]]
    prog = Progress(len(cells), enabled=progress_enabled)
    grouped_note = False
    mon = CpuMonitor()
    try:
        for ci, (rule, dtype, threads, wl) in enumerate(cells):
            first_rec, t_cell = len(records), time.perf_counter()
            mon.others()
            itemsize = np.dtype(dtype).itemsize
            prog.start_cell(("" if rule is ADAM else f"{rule.title} ") +
                            f"{dtype} {threads}T {wl.label}")
            if torch_mod is not None:
                torch_mod.set_num_threads(threads)
            unit = wl.n_elems * itemsize
            want, skipped = [], {}
            for key in impls:
                if key == "numpy" and rule is not ADAM:
                    continue
                if key == "torch_fused" and not rule.fused:
                    continue
                if key in ("numpy", "reference") and threads != s.threads[0] \
                        and not s.numpy_all_threads:
                    continue
                if key in SLOW_IMPLS and s.slow_limit and wl.n_elems > s.slow_limit:
                    skipped[key] = f"skipped above {_fmt_count(s.slow_limit)} elements " \
                                   f"(--slow-limit)"
                    continue
                want.append(key)
            entries = []
            if s.roofline:
                entries.append(("roofline", Roofline.mem_units(wl, rule) * unit))
            for key in want:
                units = (FastAdam.mem_units(wl, rule) if key == "fastadam"
                         else PEERS[key].mem_units(wl, rule))
                entries.append((key, int(units * unit)))
            groups, too_big = _plan_groups(entries, s.max_memory, unit)
            for key in too_big:
                skipped[key] = (f"needs more than --max-memory "
                                f"{s.max_memory / 2**30:.1f} GiB")
            if len(groups) > 1 and not grouped_note:
                notes.append("large workloads: implementations were measured in groups that "
                             "fit in --max-memory; the roofline was re-measured in each group "
                             "and % roof uses the one of the same group")
                grouped_note = True
            filler_g = _Filler(dtype, 1.0, s.seed + 1, s.aligned)
            grads = [filler_g.new(shape) for shape in wl.shapes]
            roof_runs = []
            for gi, group in enumerate(groups):
                filler = _Filler(dtype, 0.02, s.seed, s.aligned)
                objs, shared = [], None
                for key in group:
                    try:
                        if key == "roofline":
                            objs.append(Roofline(wl, grads, dtype, threads, filler, rule))
                        elif key == "fastadam":
                            shared = FastAdam.make_shared(wl, grads, dtype, threads, filler,
                                                          rule)
                            for isa in s.simd:
                                objs.append(FastAdam(shared, isa, isa == s.simd_in_use))
                        else:
                            objs.append(PEERS[key](wl, grads, dtype, threads, filler,
                                                   rule=rule))
                    except Exception as e:  # e.g. MemoryError, a torch dtype it lacks
                        skipped[key] = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
                res = measure_interleaved(objs, repeats=s.repeats, batch_time=s.batch_time,
                                          warm_time=s.warm_time, max_time=s.max_time,
                                          progress=prog)
                labels = {o.key: o for o in objs}
                objs = shared = None
                gc.collect()
                roof = res.get("roofline")
                roof_med = (statistics.median(roof["samples"])
                            if roof and "samples" in roof else None)
                fa_key = next((o.key for o in labels.values() if o.key == "fastadam"
                               or (o.kind == "fastadam" and o.isa == -1)), None)
                for key, r in res.items():
                    o = labels[key]
                    rec = _record(wl, dtype, threads, key, o, r, gi, roof_med, len(groups),
                                  rule)
                    if rec["status"] == "ok":
                        pr = _paired(roof, r)
                        if pr is not None and key != "roofline":
                            rec["pct_roofline"] = 100.0 * pr
                        if fa_key is not None and key != fa_key and o.kind != "roofline":
                            rec["vs_fastadam"] = _paired(r, res.get(fa_key))
                    if key == "roofline":
                        roof_runs.append(rec)
                    else:
                        records.append(rec)
            if roof_runs:
                best = sorted(roof_runs, key=lambda r: r.get("sec_per_step", math.inf))
                rec = dict(best[len(best) // 2])
                rec["group_sec_per_step"] = [r.get("sec_per_step") for r in roof_runs]
                records.append(rec)
            for key, why in skipped.items():
                records.append(dict(_base(wl, dtype, threads, rule), impl=key,
                                    label=_label_of(key, rule), status="skipped", note=why))
            del grads
            gc.collect()
            others = mon.others()
            for rec in records[first_rec:]:
                rec["cell_seconds"] = time.perf_counter() - t_cell
                rec["others_cpu"] = others
            if log:
                log(ci)
    finally:
        prog.done()
        if torch_mod is not None and torch_threads0:
            torch_mod.set_num_threads(torch_threads0)
    return records, notes


def _paired(num, den):
    """Median over the rounds both ran of num's time / den's time (batches of one round run
    back to back, so the ratio is robust to the machine's drift), or None."""
    if not num or not den or "samples" not in num or "samples" not in den:
        return None
    a = dict(zip(num["rounds"], num["samples"]))
    ratios = [a[r] / x for r, x in zip(den["rounds"], den["samples"]) if r in a and x > 0]
    return statistics.median(ratios) if ratios else None


def _label_of(key, rule=ADAM):
    if key == "roofline":
        return Roofline.label
    if key == "fastadam":
        return "fastadam"
    if key in TORCH_IMPLS:
        return PEERS[key].label_for(rule)
    return PEERS[key].label if key in PEERS else key


def _base(wl, dtype, threads, rule=ADAM):
    b = {"workload": wl.name, "workload_label": wl.label, "kind": wl.kind,
         "n_tensors": wl.n_tensors, "n_elems": wl.n_elems, "dtype": dtype,
         "threads": threads, "optimizer": rule.name}
    if rule is not ADAM:
        b.update(streams=rule.streams, bytes_per_elem=rule.bytes_per_elem(dtype))
    return b


def _record(wl, dtype, threads, key, obj, r, group, roof_med, ngroups, rule=ADAM):
    rec = dict(_base(wl, dtype, threads, rule), impl=key, label=obj.label,
               simd=getattr(obj, "isa_name", None), group=group, groups=ngroups)
    if hasattr(obj, "offsets"):
        rec["buffer_offsets_mod64"] = obj.offsets   # of the params and grads passed in
    if "error" in r:
        rec.update(status="error", note=r["error"])
        return rec
    v = r["samples"]
    q1, med, q3 = _quartiles(v)
    nbytes = rule.bytes_per_elem(dtype) * wl.n_elems
    rec.update(status="ok", sec_per_step=med, sec_q1=q1, sec_q3=q3, sec_min=min(v),
               sec_max=max(v), iqr_rel=(q3 - q1) / med if med > 0 else None,
               batches=len(v), steps_per_batch=r["steps_per_batch"],
               warmup_steps=r["warmup_steps"], rewarm=r["rewarm"], capped=r["capped"],
               samples=v, rounds=r["rounds"], elems_per_s=wl.n_elems / med,
               gbps=nbytes / med / 1e9,
               roofline_sec_per_step=roof_med,
               pct_roofline=(100.0 * roof_med / med) if roof_med else None)
    return rec


# ----------------------------------------------------------------------------- output


def _fmt_time(sec):
    if sec is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if sec >= 0.9995 * f or unit == "ns":
            x = sec / f
            return f"{x:.3g} {unit}" if x < 100 else f"{x:.0f} {unit}"
    return f"{sec:.3g} s"


def _fmt_sci(x):
    if x is None:
        return "-"
    e = int(math.floor(math.log10(x))) if x > 0 else 0
    return f"{x / 10 ** e:.2f}e{e}"


_ISA_ORDER = ["avx512", "avx2", "sse2", "neon", "scalar"]


def _row_order(rec):
    key = rec["impl"]
    base = "fastadam" if key.startswith("fastadam") else key
    order = ["roofline"] + IMPL_ORDER
    isa = key[len("fastadam["):-1] if key.startswith("fastadam[") else ""
    return (order.index(base) if base in order else 99,
            _ISA_ORDER.index(isa) if isa in _ISA_ORDER else -1, key)


def format_table(data):
    """The terminal report, as a string."""
    m, v, st = data["machine"], data["versions"], data["settings"]
    recs = data["results"]
    out = []
    cfg = v.get("fastadam_config", {})
    out.append(f"fastadam {v.get('fastadam')} bench - {m.get('cpu_model')}, "
               f"{m.get('usable_cpus')} CPUs usable, caches {m.get('caches_per_cpu0') or '?'}")
    out.append(f"python {v.get('python')}, numpy {v.get('numpy')}, torch "
               f"{v.get('torch') or 'not installed'}; fastadam SIMD in use {cfg.get('simd')} "
               f"(usable: {', '.join(cfg.get('simd_available', []))}), OpenMP "
               f"{'yes' if cfg.get('openmp') else 'no'}")
    if m.get("loadavg_start"):
        out.append(f"load average at start: {m['loadavg_start']}")
    out.append("parameters and gradients: " + (
        "64-byte aligned (--aligned)" if st.get("aligned") else
        "allocated by NumPy as users pass them (--aligned: 64-byte aligned); fastadam's "
        "moments and the roofline's buffers are 64-byte aligned"))
    out.append(f"time per step: median over {st.get('repeats')} interleaved batches "
               f"(IQR: interquartile range / median); GB/s at 28 B/element (float32), "
               f"56 (float64); % roof = roofline time / time and 'fastadam is' = this row's "
               f"time / fastadam's, both medians of the ratios within each round")
    cols = ["workload", "implementation", "time/step", "IQR", "elem/s", "GB/s", "% roof",
            "fastadam is"]
    keyset = []
    for r in recs:
        k = (_rule_of(r), r["dtype"], r["threads"])
        if k not in keyset:
            keyset.append(k)
    if any(k[0] != "adam" for k in keyset):
        out.append("other rules (--optimizer): the same columns; GB/s and the roofline count "
                   "the rule's own streams (each read once, all but grad written once), "
                   "given in the section title; options as in the notes below")
    in_use = cfg.get("simd")
    for rule, dtype, threads in keyset:
        rows = []
        sec = [r for r in recs if r["dtype"] == dtype and r["threads"] == threads
               and _rule_of(r) == rule]
        wls = []
        for r in sec:
            if r["workload"] not in wls:
                wls.append(r["workload"])
        for w in wls:
            rs = sorted([r for r in sec if r["workload"] == w], key=_row_order)
            fa = [r for r in rs if r["impl"] == "fastadam" and r["status"] == "ok"] or \
                 [r for r in rs if r["impl"] == f"fastadam[{in_use}]" and r["status"] == "ok"]
            fa_t = fa[0]["sec_per_step"] if fa else None
            first = True
            busy = max((r.get("others_cpu") or 0.0) for r in rs)
            for r in rs:
                wl = r["workload_label"] + (" !" if busy > BUSY else "") if first else ""
                first = False
                if r["status"] != "ok":
                    rows.append([wl, r["label"], r["status"], "", "", "", "",
                                 r.get("note", "")])
                    continue
                t = r["sec_per_step"]
                x = r.get("vs_fastadam") or (t / fa_t if fa_t else None)
                if r["impl"] == "roofline" or r["impl"] == (fa[0]["impl"] if fa else None) \
                        or not x:
                    rel = ""
                else:
                    rel = f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
                pct = r.get("pct_roofline")
                rows.append([wl, r["label"] + (" (capped)" if r.get("capped") else ""),
                             _fmt_time(t),
                             f"{100 * r['iqr_rel']:.1f}%" if r.get("iqr_rel") is not None
                             else "-",
                             _fmt_sci(r["elems_per_s"]), f"{r['gbps']:.1f}",
                             f"{pct:.0f}%" if pct is not None and r["impl"] != "roofline"
                             else "", rel])
        out.append("")
        head = f"{dtype}, {threads} thread{'s' if threads != 1 else ''}"
        if rule != "adam":
            spec = RULE_SPECS.get(rule)
            head = (f"{spec.title if spec else rule}: {head}"
                    + (f", {spec.streams} streams = {spec.bytes_per_elem(dtype)} B/element"
                       if spec else ""))
        out.append(f"== {head}")
        out.append(_table(cols, rows, right={2, 3, 4, 5, 6}))
    summ = data.get("rules_summary") or (rule_summary(recs) if any(
        k[0] != "adam" for k in keyset) else None)
    if summ:
        out.append("")
        out += format_summary(summ)
    scal = _scaling(recs)
    if scal:
        out.append("")
        out.append("== fastadam thread scaling (time at 1 thread / time at n threads)")
        out.append(_table(scal[0], scal[1], right=set(range(2, len(scal[0])))))
    notes = data.get("notes") or []
    marks = []
    if any(r.get("capped") for r in recs):
        marks.append("(capped): a slow implementation stopped after --max-time seconds of "
                     "batches (>= 3 batches)")
    busy = [r.get("others_cpu") or 0.0 for r in recs]
    if busy and max(busy) > BUSY:
        marks.append(f"!: other processes used up to {100 * max(busy):.0f}% of the CPUs "
                     f"while this workload was measured: its timings are disturbed (threaded "
                     f"ones most); rerun on a quiet machine")
    if any(str(r.get("label", "")).endswith(" *") for r in recs):
        marks.append("*: the SIMD path fastadam uses by default here")
    if notes or marks:
        out.append("")
        out += [f"note: {n}" for n in notes + marks]
    return "\n".join(out)


def _rule_of(rec):
    return rec.get("optimizer", "adam")


def _scaling(recs):
    fa = [r for r in recs if r["impl"] == "fastadam" and r["status"] == "ok"]
    threads = sorted({r["threads"] for r in fa})
    if len(threads) < 2 or 1 not in threads:
        return None
    rows = []
    rules = list(dict.fromkeys(_rule_of(r) for r in fa))
    for rule, dtype in dict.fromkeys((_rule_of(r), r["dtype"]) for r in fa):
        for w in dict.fromkeys(r["workload"] for r in fa if r["dtype"] == dtype
                               and _rule_of(r) == rule):
            by = {r["threads"]: r for r in fa if r["dtype"] == dtype and r["workload"] == w
                  and _rule_of(r) == rule}
            if 1 not in by:
                continue
            title = RULE_SPECS[rule].title if rule in RULE_SPECS else rule
            row = [(f"{title}: " if rules != ["adam"] else "") + by[1]["workload_label"],
                   dtype]
            for t in threads[1:]:
                row.append(f"{by[1]['sec_per_step'] / by[t]['sec_per_step']:.2f}x"
                           if t in by else "-")
            rows.append(row)
    return ["workload", "dtype"] + [f"{t} threads" for t in threads[1:]], rows


# the targets (float32): in cache, at least as fast as torch fused where torch has
# one for the rule, else SPEED_TARGET x torch's fastest; out of cache within ROOF_TARGET % of
# the rule's roofline
TARGET_FAST = ("n1e6", "many_small")
TARGET_ROOF = ("n1e8",)
SPEED_TARGET, ROOF_TARGET = 3.0, 95.0
_TORCH_KEYS = ("torch_fused", "torch_foreach", "torch_forloop")


def rule_summary(recs):
    """One row per rule x dtype x workload x threads where fastadam ran: the times of
    fastadam and torch's three, fastadam's lead ("vs": torch time / fastadam time, the
    median of the per-round ratios; > 1 means fastadam is faster) over torch fused and over
    torch's fastest, % of the rule's roofline, and the target of that workload."""
    ok = [r for r in recs if r.get("status") == "ok"]
    cells = {}
    for r in ok:
        cells.setdefault((_rule_of(r), r["dtype"], r["workload"], r["threads"]), {})[
            r["impl"]] = r
    rows = []
    for (rule, dtype, w, th), cell in cells.items():
        fa = cell.get("fastadam")
        if fa is None:
            continue
        t_fa = fa["sec_per_step"]

        def vs(rec):
            return rec.get("vs_fastadam") or rec["sec_per_step"] / t_fa

        row = dict(optimizer=rule, dtype=dtype, workload=w, workload_label=fa["workload_label"],
                   threads=th, n_elems=fa["n_elems"], fastadam=t_fa,
                   fastadam_gbps=fa.get("gbps"), pct_roofline=fa.get("pct_roofline"),
                   others_cpu=max((r.get("others_cpu") or 0.0) for r in cell.values()))
        for k in _TORCH_KEYS + ("reference", "roofline"):
            row[k] = cell[k]["sec_per_step"] if k in cell else None
        if "roofline" in cell:
            row["roofline_gbps"] = cell["roofline"]["gbps"]
        row["vs_torch_fused"] = vs(cell["torch_fused"]) if "torch_fused" in cell else None
        tr = {k: vs(cell[k]) for k in _TORCH_KEYS if k in cell}
        row["torch_fastest"] = min(tr, key=tr.get) if tr else None
        row["vs_torch_fastest"] = min(tr.values()) if tr else None
        spec = RULE_SPECS.get(rule)
        target = met = None
        if w in TARGET_FAST:
            if spec is not None and spec.fused:
                target = ">= torch fused"
                met = None if row["vs_torch_fused"] is None else row["vs_torch_fused"] >= 1.0
            else:
                target = f">= {SPEED_TARGET:g}x torch fastest"
                met = (None if row["vs_torch_fastest"] is None
                       else row["vs_torch_fastest"] >= SPEED_TARGET)
        elif w in TARGET_ROOF:
            target = f">= {ROOF_TARGET:g}% roofline"
            met = None if row["pct_roofline"] is None else row["pct_roofline"] >= ROOF_TARGET
        row["target"], row["target_met"] = target, met
        rows.append(row)
    return rows


def format_summary(rows):
    """The per-rule summary table (a list of lines)."""
    cols = ["rule", "workload", "threads", "fastadam", "torch fused", "torch foreach",
            "torch for-loop", "vs fused", "vs fastest", "% roof", "target", "met"]
    out_rows = []
    for r in rows:
        spec = RULE_SPECS.get(r["optimizer"])
        x = r.get("vs_torch_fastest")
        fastest = {"torch_fused": "fused", "torch_foreach": "foreach",
                   "torch_forloop": "loop"}.get(r.get("torch_fastest"), "")
        met = r.get("target_met")
        out_rows.append([
            spec.title if spec else r["optimizer"],
            r["workload_label"] + ("" if r["dtype"] == "float32" else f" {r['dtype']}")
            + (" !" if (r.get("others_cpu") or 0.0) > BUSY else ""),
            r["threads"], _fmt_time(r["fastadam"]),
            _fmt_time(r["torch_fused"]) if r.get("torch_fused") else "n/a"
            if spec is not None and not spec.fused else "-",
            _fmt_time(r.get("torch_foreach")), _fmt_time(r.get("torch_forloop")),
            f"{r['vs_torch_fused']:.2f}x" if r.get("vs_torch_fused") else "-",
            f"{x:.2f}x ({fastest})" if x else "-",
            f"{r['pct_roofline']:.0f}%" if r.get("pct_roofline") else "-",
            r.get("target") or "", "" if met is None else ("yes" if met else "NO")])
    return [f"== summary: fastadam against torch per rule (vs = torch time / fastadam time, "
            f"median of per-round ratios; > 1: fastadam faster; n/a: torch has no fused "
            f"CPU kernel for the rule; -: not measured; !: disturbed by other processes)",
            _table(cols, out_rows, right={2, 3, 4, 5, 6, 7, 8, 9})]


def _table(cols, rows, right=()):
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(cols)]

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            c = str(c)
            parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cols), sep] + [line(r) for r in rows])


def check_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'fastadam[bench]')")
    return None


def write_plot(data, path):
    """PNG: time per step and % of roofline against the number of elements, one line per
    implementation; one row of panels per (dtype, threads). One rule: Adam when it was
    measured, else the first (the other rules' figures are in the table and the JSON)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recs = [r for r in data["results"] if r["status"] == "ok"]
    rules = list(dict.fromkeys(_rule_of(r) for r in recs))
    rule = "adam" if "adam" in rules else (rules[0] if rules else "adam")
    recs = [r for r in recs if _rule_of(r) == rule]
    title_rule = RULE_SPECS[rule].title if rule in RULE_SPECS else rule
    keys = list(dict.fromkeys((r["dtype"], r["threads"]) for r in recs))
    if not keys:
        raise ValueError("nothing to plot: no successful measurements")
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 4.2 * len(keys)), squeeze=False)
    impls = sorted(dict.fromkeys(r["impl"] for r in recs),
                   key=lambda k: _row_order({"impl": k}))
    labels = {r["impl"]: r["label"] for r in recs}
    cmap = plt.get_cmap("tab10")
    color = {k: cmap(i % 10) for i, k in enumerate(impls)}
    markers = {"gpt2_small": "D", "resnet50": "s", "many_small": "^"}
    for row, (dtype, threads) in enumerate(keys):
        ax_t, ax_p = axes[row]
        sec = [r for r in recs if r["dtype"] == dtype and r["threads"] == threads]
        for k in impls:
            rs = sorted([r for r in sec if r["impl"] == k and r["kind"] == "tensor"],
                        key=lambda r: r["n_elems"])
            style = dict(color=color[k], lw=2.2 if k.startswith("fastadam") else 1.4,
                         ls="--" if k == "roofline" else "-")
            if rs:
                x = [r["n_elems"] for r in rs]
                ax_t.plot(x, [r["sec_per_step"] for r in rs], marker="o", ms=4,
                          label=labels[k], **style)
                if k != "roofline":
                    ax_p.plot(x, [r["pct_roofline"] or float("nan") for r in rs],
                              marker="o", ms=4, label=labels[k], **style)
            for r in sec:
                if r["impl"] == k and r["kind"] == "model":
                    mk = markers.get(r["workload"], "x")
                    ax_t.scatter([r["n_elems"]], [r["sec_per_step"]], marker=mk,
                                 color=color[k], s=40, zorder=3)
                    if k != "roofline" and r.get("pct_roofline"):
                        ax_p.scatter([r["n_elems"]], [r["pct_roofline"]], marker=mk,
                                     color=color[k], s=40, zorder=3)
        title = f"{dtype}, {threads} thread{'s' if threads != 1 else ''}"
        ax_t.set(xscale="log", yscale="log", xlabel="elements per step",
                 ylabel="time per step [s]", title=f"time per {title_rule} step ({title})")
        ax_p.set(xscale="log", yscale="log", xlabel="elements per step",
                 ylabel="% of roofline (roofline time / time)",
                 title=f"% of the memory roofline ({title})")
        ax_p.axhline(100, color="grey", lw=0.8, ls=":")
        for ax in (ax_t, ax_p):
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8, loc="upper left")
        present = [w for w in markers if any(r["workload"] == w for r in sec)]
        if present:
            from matplotlib.lines import Line2D

            names = {"gpt2_small": "GPT-2 small", "resnet50": "ResNet-50",
                     "many_small": "1000 x 1000"}
            ax_p.legend(handles=[Line2D([], [], color="k", marker=markers[w], ls="",
                                        label=names[w]) for w in present],
                        fontsize=8, loc="lower left", title="model-shaped sets",
                        title_fontsize=8)
    m, v = data["machine"], data["versions"]
    fig.suptitle(f"fastadam {v.get('fastadam')} - {m.get('cpu_model')}, "
                 f"{m.get('usable_cpus')} CPUs; numpy {v.get('numpy')}, "
                 f"torch {v.get('torch') or '-'}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _import_torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def main(argv=None, prog=None):
    """Entry point of ``python -m fastadam bench`` and ``fastadam-bench``; returns an exit
    code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if prog is None and sys.argv and os.path.basename(sys.argv[0]).startswith("fastadam-bench"):
        prog = "fastadam-bench"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.formats is not None and not args.load:
        from . import bench_formats

        return bench_formats.main(args, argv)
    if args.plot:
        why = check_matplotlib()
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    if args.load:
        try:
            with open(args.load) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"error: --load {args.load}: {e}", file=sys.stderr)
            return 2
        if data.get("schema") == "fastadam-bench-formats/1":
            from . import bench_formats

            if args.plot:
                print("error: --plot: a --formats run has no plot", file=sys.stderr)
                return 2
            print(bench_formats.format_report(data), flush=True)
            return 0
        if data.get("schema") != SCHEMA:
            print(f"error: --load {args.load}: not a fastadam bench file", file=sys.stderr)
            return 2
    else:
        try:
            s = resolve(args)
        except (argparse.ArgumentTypeError, SystemExit) as e:
            msg = str(e) if str(e) else "bad arguments"
            print(f"error: {msg}", file=sys.stderr)
            return 2
        if not s.sizes and not s.models and (s.optimizers == ["adam"] or (
                not s.rule_sizes and not s.rule_models)):
            print("error: nothing to measure (--sizes none and --models none)",
                  file=sys.stderr)
            return 2
        torch_mod = _import_torch() if any(i in TORCH_IMPLS for i in s.impls) else None
        t0 = time.time()
        machine = machine_info()
        records, notes = run(s, torch_mod, progress_enabled=not args.quiet)
        machine["loadavg_end"] = _read("/proc/loadavg").strip()
        settings = {k: getattr(s, k) for k in (
            "sizes", "models", "dtypes", "threads", "simd", "simd_in_use", "impls",
            "roofline", "repeats", "batch_time", "max_time", "warm_time", "slow_limit",
            "numpy_all_threads", "max_memory", "aligned", "quick", "seed")}
        settings["argv"] = argv
        settings["hyperparameters"] = {"lr": LR, "betas": list(BETAS), "eps": EPS}
        settings["optimizers"] = s.optimizers
        data = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "elapsed_s": time.time() - t0, "machine": machine,
                "versions": versions(torch_mod), "settings": settings, "notes": notes,
                "results": records}
        if s.optimizers != ["adam"]:      # the other rules: new keys, Adam's stay as they were
            settings["rule_sizes"], settings["rule_models"] = s.rule_sizes, s.rule_models
            settings["rules"] = {o: RULE_SPECS[o].as_json() for o in s.optimizers}
            data["rules_summary"] = rule_summary(records)
    print(format_table(data), flush=True)
    code = 0
    if args.json and not args.load:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=_json_default)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            write_plot(data, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except Exception as e:
            print(f"error: --plot {args.plot}: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    return code


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
