"""``python -m fastadam bench --formats``: the storage formats (docs/formats.md) against
their peers, with each format's memory and its own roofline.

Rows (all AdamW, lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2, bias
correction; every implementation steps the same gradients):

* fastadam through its NumPy API (``fastadam.AdamW(..., master_weights=, state_dtype=,
  rounding=)``), one row per format (FORMATS): float32; float32 params with 8-bit moments;
  bfloat16 params and grads with bfloat16 moments and no master (nearest, and stochastic
  rounding); bfloat16 params and grads with float32 master weights and float32 moments;
  the same with 8-bit moments.
* the peers, each only where it imports and steps here (else reported absent, with why):
  torch.optim.AdamW(fused=True) on float32 and on bfloat16 params (its state is then
  bfloat16); DeepSpeed's DeepSpeedCPUAdam on float32 params, on bfloat16 params with
  float32 state, and with bfloat16 state; DeepSpeed's engine path, as ZeRO-Offload drives
  CPUAdam for a bf16 model (see DeepSpeedEngine: the 16-bit gradients copied into a flat
  float32 buffer, CPUAdam on the flat float32 master, the master copied back to the 16-bit
  parameters: three passes); bitsandbytes' AdamW8bit on the CPU (blockwise 8-bit moments,
  float32 params).
* per fastadam format, its roofline: the format's streams at their own element sizes
  (param, grad, [master], moments), each read and written once except the grad (read
  only), no arithmetic, threaded like a step (``fastadam._core.traffic``; where the core
  does not have it yet, ``traffic_f32`` over four float32 streams moving the same number
  of bytes stands in, and the report says so).

Columns: bytes per element and step (what the format must move: every stream it reads,
every stream it writes; a 16-bit parameter with master weights is only written, and
8-bit blocks add their float32 absmax, 4 bytes per 256 elements, read and written);
resident optimizer bytes per parameter (what the optimizer holds besides the parameter
and its gradient: moments, master, absmax; measured on the live state); time per step,
GB/s at the row's own bytes, % of the format's own roofline, and the speedup over the
float32 baseline of the issue's targets: the faster of torch fused and DeepSpeed's
CPUAdam on float32, per round (the median over rounds of min(torch fused, DeepSpeed) /
fastadam, both measured in the same round).

Timing is the main bench's (measure.py: bench.measure_interleaved: warm-up, calibration,
round-robin batches, medians). Thread counts run in this process: fastadam's ``num_threads`` and
``torch.set_num_threads`` (one OpenMP runtime serves torch, DeepSpeed's extension and
fastadam here). Memory: a cell's rows are packed into groups that fit ``--max-memory``,
each group holding the two baselines (torch fused and DeepSpeed float32) and whole
families of rows when they fit (a format beside the peers of its target), so that every
ratio is measured within one group.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time

import numpy as np

from .. import bench
from .workloads import BETAS, EPS, LR

SCHEMA = "fastadam-bench-formats/1"
WD = 1e-2  # AdamW's weight decay (torch's default) for every row
Q8_BLOCK, Q8_MIN_NUMEL = 256, 4096
ROOF_TARGET = 90.0  # % of its own roofline, every format, out of cache
ANCHORS = ("torch_fused", "deepspeed")  # the float32 baseline of the speed targets


# ----------------------------------------------------------------------------- rows


class Format:
    """One fastadam storage format, as the NumPy API is asked for it.

    param, grad: "float32" or "bfloat16"; state: None (the default of docs/formats.md),
    "bfloat16" or "8bit"; master: master_weights; roof: the key of the format whose
    roofline this one shares (the same streams)."""

    kind = "fastadam"

    def __init__(
        self, key, label, param, grad, master=False, state=None, rounding="nearest", roof=None
    ):
        self.key, self.label = key, label
        self.param, self.grad, self.master, self.state = param, grad, master, state
        self.rounding = rounding
        self.roof = roof or key

    def options(self):
        """The format options given to fastadam.AdamW (only those that differ from the
        defaults, so that the float32 row runs on a fastadam without formats)."""
        o = {}
        if self.master:
            o["master_weights"] = True
        if self.state is not None:
            o["state_dtype"] = self.state
        if self.rounding != "nearest":
            o["rounding"] = self.rounding
        return o

    def state_size(self, n):
        """Bytes per element of each moment of an n-element tensor (8-bit: the code and
        the block's absmax share; fewer than 4096 elements keep float32)."""
        if self.state == "8bit":
            if n < Q8_MIN_NUMEL:
                return 4.0
            return 1.0 + 4.0 * math.ceil(n / Q8_BLOCK) / n
        if self.state == "bfloat16":
            return 2.0
        if self.state == "float32" or self.master:
            return 4.0
        return float(_ITEMSIZE[self.param])

    def streams(self):
        """(name, bytes per element, read, written) of a large tensor's streams."""
        p, g = _ITEMSIZE[self.param], _ITEMSIZE[self.grad]
        s = {"8bit": 1, "bfloat16": 2, "float32": 4}.get(self.state, 4 if self.master else p)
        out = [("param", p, not self.master, True), ("grad", g, True, False)]
        if self.master:
            out.append(("master", 4, True, True))
        out += [("exp_avg", s, True, True), ("exp_avg_sq", s, True, True)]
        return out

    @property
    def bytes_per_elem(self):
        b = sum(size * (r + w) for _, size, r, w in self.streams())
        if self.state == "8bit":
            b += 2 * 2 * 4 / Q8_BLOCK  # two absmax streams, read and written
        return b

    @property
    def roof_sizes(self):
        """Element sizes of the roofline's streams (grad second: the one only read)."""
        return [size for _, size, _, _ in self.streams()]

    @property
    def roof_bytes_per_elem(self):
        sizes = self.roof_sizes
        return 2 * sum(sizes) - sizes[1]

    def resident(self, sizes):
        """Declared optimizer bytes (master, moments, absmax) for tensors of these sizes."""
        tot = 0.0
        for n in sizes:
            master = 4 if self.master and self.param != "float32" else 0
            tot += n * (master + 2 * self.state_size(n))
        return tot

    def mem(self):
        """Bytes per element this row allocates (its params and state; grads are shared)."""
        return _ITEMSIZE[self.param] + 4 * self.master + 2 * self.state_size(1 << 30)

    def as_json(self):
        return {
            "kind": "fastadam",
            "label": self.label,
            "param": self.param,
            "grad": self.grad,
            "master_weights": self.master,
            "state_dtype": self.state,
            "rounding": self.rounding,
            "options": self.options(),
            "bytes_per_elem": self.bytes_per_elem,
            "roofline_bytes_per_elem": self.roof_bytes_per_elem,
            "roofline_streams": self.roof_sizes,
            "roofline_of": self.roof,
            "streams": [dict(name=n, bytes=s, read=r, written=w) for n, s, r, w in self.streams()],
        }


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}

FORMATS = {
    f.key: f
    for f in (
        Format("fastadam_f32", "fastadam fp32", "float32", "float32"),
        Format(
            "fastadam_f32_8bit", "fastadam fp32 + 8-bit state", "float32", "float32", state="8bit"
        ),
        Format("fastadam_bf16", "fastadam bf16 + bf16 state", "bfloat16", "bfloat16"),
        Format(
            "fastadam_bf16_sr",
            "fastadam bf16 + bf16 state, stochastic",
            "bfloat16",
            "bfloat16",
            rounding="stochastic",
            roof="fastadam_bf16",
        ),
        Format(
            "fastadam_bf16_master",
            "fastadam bf16 + fp32 master + fp32 state",
            "bfloat16",
            "bfloat16",
            master=True,
        ),
        Format(
            "fastadam_bf16_master_8bit",
            "fastadam bf16 + fp32 master + 8-bit state",
            "bfloat16",
            "bfloat16",
            master=True,
            state="8bit",
        ),
    )
}


class PeerSpec:
    """A peer row: what it moves per element (its algorithm in one perfect pass, or its
    passes), the bytes it allocates per element (for the memory groups) and its class."""

    kind = "peer"

    def __init__(self, key, label, short, bytes_per_elem, mem, how, needs, grad="float32"):
        self.key, self.label, self.short = key, label, short
        self.bytes_per_elem, self.mem = bytes_per_elem, mem
        self.how, self.needs, self.grad = how, needs, grad

    def as_json(self):
        return {
            "kind": "peer",
            "label": self.label,
            "bytes_per_elem": self.bytes_per_elem,
            "traffic": self.how,
            "needs": self.needs,
        }


PEER_SPECS = {
    p.key: p
    for p in (
        PeerSpec(
            "torch_fused",
            "torch fused AdamW fp32",
            "torch fp32",
            28,
            12,
            "R p,g,m,v 4x4 + W p,m,v 3x4",
            "torch",
        ),
        PeerSpec(
            "deepspeed",
            "DeepSpeed CPUAdam fp32",
            "DS fp32",
            28,
            12,
            "R p,g,m,v 4x4 + W p,m,v 3x4",
            "deepspeed",
        ),
        PeerSpec(
            "bnb_8bit",
            "bitsandbytes AdamW8bit (CPU)",
            "bnb 8-bit",
            16 + 16 / Q8_BLOCK,
            28,
            "R p,g 4+4, m,v 1+1 + W p 4, m,v 1+1 (+ absmax); its CPU path runs many "
            "torch ops with float32 temporaries",
            "bitsandbytes",
        ),
        PeerSpec(
            "torch_fused_bf16",
            "torch fused AdamW bf16 (bf16 state)",
            "torch bf16",
            14,
            6,
            "R p,g,m,v 4x2 + W p,m,v 3x2",
            "torch",
            "bfloat16",
        ),
        PeerSpec(
            "deepspeed_bf16_bf16state",
            "DeepSpeed CPUAdam bf16, bf16 state",
            "DS bf16/bf16",
            14,
            6,
            "R p,g,m,v 4x2 + W p,m,v 3x2",
            "deepspeed",
            "bfloat16",
        ),
        PeerSpec(
            "deepspeed_bf16",
            "DeepSpeed CPUAdam bf16, fp32 state",
            "DS bf16/fp32",
            22,
            10,
            "R p,g 2+2, m,v 4+4 + W p 2, m,v 4+4",
            "deepspeed",
            "bfloat16",
        ),
        PeerSpec(
            "deepspeed_engine",
            "DeepSpeed engine: g->fp32, fp32 step, copy-back",
            "DS engine",
            40,
            18,
            "R g16 2 + W g32 4; R p32,g32,m,v 4x4 + W p32,m,v 3x4; R p32 4 + W p16 2",
            "deepspeed",
            "bfloat16",
        ),
    )
}

# Rows measured together when memory allows: a format beside the peers of its target.
FAMILIES = [
    ["fastadam_f32"],
    ["fastadam_f32_8bit", "bnb_8bit"],
    ["fastadam_bf16", "fastadam_bf16_sr", "torch_fused_bf16", "deepspeed_bf16_bf16state"],
    ["fastadam_bf16_master", "deepspeed_bf16", "deepspeed_engine"],
    ["fastadam_bf16_master_8bit"],
]
# families whose targets are not against the float32 baseline: their group may go without
# the anchors when it does not fit with them
NO_ANCHORS_OK = {"fastadam_bf16_master"}
ROW_ORDER = [k for fam in FAMILIES for k in fam] + list(ANCHORS)
DISPLAY_ORDER = list(ANCHORS) + [k for fam in FAMILIES for k in fam]
SPECS = dict(FORMATS, **PEER_SPECS)

# The targets: (kind, argument, threshold) per format; "speedup": the faster of
# torch fused and DeepSpeed fp32 over fastadam; "vs": that peer over fastadam (> threshold)
TARGETS = {
    "fastadam_f32_8bit": [("speedup", None, 1.6)],
    "fastadam_bf16": [("speedup", None, 1.8)],
    "fastadam_bf16_master": [("vs", "deepspeed_bf16", 1.0), ("vs", "deepspeed_engine", 1.0)],
    "fastadam_bf16_master_8bit": [("speedup", None, 1.6)],
}


def _label(key):
    if key.startswith("roofline:"):
        f = FORMATS[key.split(":", 1)[1]]
        return f"  roofline of {f.label[len('fastadam ') :]} ({f.roof_bytes_per_elem:g} B)"
    return SPECS[key].label if key in SPECS else key


# ----------------------------------------------------------------------------- data


def _bf16_dtype():
    """NumPy's bfloat16 (ml_dtypes), or None."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _to_bf16_bits(a, torch=None):
    """The bfloat16 bits (uint16, nearest-even) of a float32 array."""
    bf16 = _bf16_dtype()
    if bf16 is not None:
        return a.astype(bf16).view(np.uint16)
    t = torch.from_numpy(a).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


class Data:
    """One cell's gradients, shared read only by every row: float32, and (when a row
    needs them) their bfloat16 image, as NumPy arrays and as torch tensors on the same
    memory."""

    def __init__(self, wl, seed, aligned, torch, need_bf16):
        self.torch = torch
        filler = bench._Filler(np.float32, 1.0, seed + 1, aligned)
        self.g32 = [filler.new(shape) for shape in wl.shapes]
        self.g16 = (
            [_to_bf16_bits(g, torch) for g in self.g32]
            if need_bf16 and (torch is not None or _bf16_dtype() is not None)
            else None
        )

    def numpy(self, dtype):
        if dtype == "float32":
            return self.g32
        bf16 = _bf16_dtype()
        if bf16 is None:
            raise RuntimeError("bfloat16 NumPy arrays need ml_dtypes (pip install ml_dtypes)")
        return [g.view(bf16) for g in self.g16]

    def tensors(self, dtype):
        t = self.torch
        if dtype == "float32":
            return [t.from_numpy(g) for g in self.g32]
        return [t.from_numpy(g.view(np.int16)).view(t.bfloat16) for g in self.g16]


def _param_values(shape, seed, aligned):
    return bench._Filler(np.float32, 0.02, seed, aligned).new(shape)


# ----------------------------------------------------------------------------- implementations


class FastAdamFormat(bench._Impl):
    """fastadam.AdamW on NumPy arrays in one format: one C call per step."""

    kind = "fastadam"

    def __init__(self, fmt, wl, data, threads, seed, aligned):
        import fastadam

        self.key, self.label = fmt.key, fmt.label
        params = []
        for i, shape in enumerate(wl.shapes):
            p = _param_values(shape, seed + i, aligned)
            if fmt.param != "float32":
                bf16 = _bf16_dtype()
                if bf16 is None:
                    raise RuntimeError(
                        "bfloat16 NumPy arrays need ml_dtypes (pip install ml_dtypes)"
                    )
                p = p.astype(bf16)
            params.append(p)
        self.params = params
        self.opt = fastadam.AdamW(
            params,
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=WD,
            num_threads=threads,
            **fmt.options(),
        )
        self.call = (self.opt.step, (data.numpy(fmt.grad),))

    def resident(self):
        return sum(
            v.nbytes for st in self.opt.state for v in st.values() if isinstance(v, np.ndarray)
        )

    def values(self):
        """The parameters, as float64 (for the tests)."""
        return [p.astype(np.float64).reshape(-1) for p in self.params]


class FormatRoofline(bench._Impl):
    """A format's streams at their element sizes, each read and written once but the grad
    (read only), no arithmetic: ``_core.traffic``. Without it (a core before formats),
    ``traffic_f32`` over four float32 streams moving the same bytes per element."""

    kind = "roofline"

    def __init__(self, fmt, n, threads, seed):
        from .. import _core

        self.key, self.label = f"roofline:{fmt.key}", _label(f"roofline:{fmt.key}")
        filler = bench._Filler(np.float32, 0.02, seed, True)
        if hasattr(_core, "traffic"):
            types = {1: np.uint8, 2: np.uint16, 4: np.float32, 8: np.float64}
            arrays = [bench._aligned((n,), types[s]) for s in fmt.roof_sizes]
            for a in arrays:
                # written once, so that every page is its own: a stream that is only read
                # (the grad) would otherwise stay mapped to the kernel's one zero page,
                # which is always in cache
                if a.dtype == np.float32:
                    filler.fill(a)
                else:
                    a.fill(1)
            self.exact = True
            self.call = (_core.traffic, (arrays, threads))
        else:
            m = max(1, round(n * fmt.roof_bytes_per_elem / 28))
            arrays = [filler.fill(bench._aligned((m,), np.float32)) for _ in range(4)]
            self.exact = False
            self.call = (_core.traffic_f32, ([arrays[0], arrays[3], arrays[1], arrays[2]], threads))
        self._keep = arrays

    @staticmethod
    def mem(fmt):
        from .. import _core

        if hasattr(_core, "traffic"):
            return sum(fmt.roof_sizes)
        return fmt.roof_bytes_per_elem / 28 * 16  # the traffic_f32 stand-in


class _TorchRow(bench._Impl):
    dtype = "float32"

    def _params(self, wl, data, seed, aligned):
        torch = self.torch = data.torch
        tdt = getattr(torch, self.dtype)
        params = []
        for i, (shape, g) in enumerate(zip(wl.shapes, data.tensors(self.dtype))):
            p = torch.empty(shape, dtype=tdt)
            with torch.no_grad():
                p.copy_(torch.from_numpy(_param_values(shape, seed + i, aligned)))
            p.requires_grad_(True)
            p.grad = g  # shared, read only
            params.append(p)
        return params

    def resident(self):
        torch = self.torch
        return sum(
            v.numel() * v.element_size()
            for st in self.opt.state.values()
            for v in st.values()
            if torch.is_tensor(v)
        )

    def values(self):
        return [p.detach().double().numpy().reshape(-1) for p in self.params]


class TorchFusedAdamW(_TorchRow):
    """torch.optim.AdamW(fused=True): float32, or bfloat16 params and grads (its state is
    zeros_like(param): bfloat16; the kernel computes in float32)."""

    def __init__(self, key, wl, data, threads, seed, aligned):
        self.key, self.label = key, _label(key)
        self.dtype = "bfloat16" if key.endswith("bf16") else "float32"
        self.params = self._params(wl, data, seed, aligned)
        self.opt = self.torch.optim.AdamW(
            self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True
        )
        self.call = (self.opt.step, ())


def _deepspeed_cpuadam():
    """DeepSpeedCPUAdam, imported with DeepSpeed's log lines sent to stderr (its logger
    writes to the stdout it finds at import). Its constructor asks py-cpuinfo for the CPU
    vendor, which starts a Python subprocess every time (about 2 s): the answer is kept
    for the process instead (the CPU does not change while we measure)."""
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    try:
        import functools

        import cpuinfo

        if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
            cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)
    except ImportError:
        pass
    return DeepSpeedCPUAdam


class DeepSpeedRow(_TorchRow):
    """DeepSpeedCPUAdam (adamw_mode, bias correction) stepping the parameters in place:
    float32; bfloat16 params and grads with float32 state (fp32_optimizer_states=True,
    its default) or bfloat16 state (False)."""

    def __init__(self, key, wl, data, threads, seed, aligned):
        self.key, self.label = key, _label(key)
        self.dtype = "float32" if key == "deepspeed" else "bfloat16"
        self.params = self._params(wl, data, seed, aligned)
        cls = _deepspeed_cpuadam()
        with contextlib.redirect_stdout(sys.stderr):
            self.opt = cls(
                self.params,
                lr=LR,
                betas=BETAS,
                eps=EPS,
                weight_decay=WD,
                bias_correction=True,
                adamw_mode=True,
                fp32_optimizer_states=key != "deepspeed_bf16_bf16state",
            )
        self.call = (self.opt.step, ())


class DeepSpeedEngine(_TorchRow):
    """How ZeRO-Offload (stages 1-2, offload_optimizer: cpu) steps a bf16 model with
    DeepSpeedCPUAdam: the model's bf16 parameters live in one flat buffer, the optimizer
    owns a flat float32 master of them and a flat float32 gradient buffer; each step
    copies every bf16 gradient into the float32 buffer (widening), runs CPUAdam on the
    float32 master, and copies the master back into the flat bf16 parameters (rounding):
    three passes, 6 + 28 + 6 = 40 bytes per element. The flat buffers are the engine's
    best case (one CPUAdam call and one copy-back for all tensors)."""

    dtype = "bfloat16"

    def __init__(self, key, wl, data, threads, seed, aligned):
        torch = self.torch = data.torch
        self.key, self.label = key, _label(key)
        n, self.sizes = wl.n_elems, wl.sizes
        self.flat16 = torch.empty(n, dtype=torch.bfloat16)
        self.master = torch.nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.master.grad = torch.empty(n, dtype=torch.float32)
        self.grad_views, self.grads16 = [], data.tensors("bfloat16")
        off = 0
        with torch.no_grad():
            for i, (shape, sz) in enumerate(zip(wl.shapes, wl.sizes)):
                v = torch.from_numpy(_param_values(shape, seed + i, aligned)).reshape(-1)
                self.flat16[off : off + sz].copy_(v)
                self.grad_views.append(self.master.grad[off : off + sz])
                off += sz
            self.master.copy_(self.flat16)
        cls = _deepspeed_cpuadam()
        with contextlib.redirect_stdout(sys.stderr):
            self.opt = cls(
                [self.master],
                lr=LR,
                betas=BETAS,
                eps=EPS,
                weight_decay=WD,
                bias_correction=True,
                adamw_mode=True,
            )
        self.call = (self.step, ())

    def step(self):
        with self.torch.no_grad():
            for dst, g in zip(self.grad_views, self.grads16):
                dst.copy_(g.reshape(-1))
            self.opt.step()
            self.flat16.copy_(self.master)

    def resident(self):
        return super().resident() + 8 * self.master.numel()  # master + fp32 grads

    def values(self):
        flat = self.flat16.double().numpy()
        return [a.copy() for a in np.split(flat, np.cumsum(self.sizes)[:-1])]


class BnbAdamW8bit(_TorchRow):
    """bitsandbytes.optim.AdamW8bit on float32 CPU params: blockwise (256) 8-bit moments
    with the dynamic maps; tensors under 4096 elements keep float32 state (its default
    min_8bit_size, the rule fastadam follows)."""

    def __init__(self, key, wl, data, threads, seed, aligned):
        import bitsandbytes as bnb

        self.key, self.label = key, _label(key)
        self.params = self._params(wl, data, seed, aligned)
        self.opt = bnb.optim.AdamW8bit(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        self.call = (self.opt.step, ())


def _make(key, wl, data, threads, seed, aligned):
    if key in FORMATS:
        return FastAdamFormat(FORMATS[key], wl, data, threads, seed, aligned)
    cls = {
        "torch_fused": TorchFusedAdamW,
        "torch_fused_bf16": TorchFusedAdamW,
        "deepspeed": DeepSpeedRow,
        "deepspeed_bf16": DeepSpeedRow,
        "deepspeed_bf16_bf16state": DeepSpeedRow,
        "deepspeed_engine": DeepSpeedEngine,
        "bnb_8bit": BnbAdamW8bit,
    }[key]
    return cls(key, wl, data, threads, seed, aligned)


def probe(key, torch):
    """None if the row can run here, else why not: the row built on two small tensors
    (one above the 8-bit threshold) and stepped twice, the result finite."""
    spec = SPECS[key]
    try:
        if isinstance(spec, Format):
            if spec.param != "float32" and _bf16_dtype() is None:
                return "needs ml_dtypes for bfloat16 NumPy arrays (pip install ml_dtypes)"
        elif torch is None:
            return "torch is not importable"
        elif spec.needs == "deepspeed":
            _deepspeed_cpuadam()
        elif spec.needs == "bitsandbytes":
            with contextlib.redirect_stdout(sys.stderr):
                from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
            if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
                return "bitsandbytes' native CPU library did not load"
        wl = bench.Workload("probe", "probe", [(5000,), (7,)], "model")
        data = Data(wl, 0, False, torch, need_bf16=True)
        obj = _make(key, wl, data, 1, 0, False)
        fn, args = obj.call
        fn(*args)
        fn(*args)
        for p in getattr(obj, "params", []):
            a = p.detach().float().numpy() if hasattr(p, "detach") else p.astype(np.float32)
            if not np.all(np.isfinite(a)):
                return "probe step gave non-finite parameters"
        if key == "bnb_8bit":
            st = obj.opt.state[obj.params[0]]
            if st["state1"].dtype != torch.uint8:
                return f"bitsandbytes kept {st['state1'].dtype} state, not 8-bit"
    except Exception as e:  # ImportError, a missing kernel, an unknown option, ...
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


# ----------------------------------------------------------------------------- grouping


def plan_groups(keys, n, budget, shared):
    """Pack the rows (the anchors aside) into groups of at most `budget` bytes: a group holds
    the anchors (unless its family's targets do not need them and they do not fit) and the
    rooflines of its fastadam rows, and whole families where they fit (split otherwise).
    Returns (groups, too_big, anchors): groups is a list of (rows, with_anchors); the
    anchors are dropped (and listed in too_big) when they do not fit beside the shared
    gradients."""
    anchors = [k for k in ANCHORS if k in keys]
    a_bytes = sum(PEER_SPECS[k].mem for k in anchors) * n
    too_big = []
    if shared + a_bytes > budget:
        too_big += anchors
        anchors, a_bytes = [], 0

    def cost(ks, with_anchors=True):
        roofs = {FORMATS[k].roof for k in ks if k in FORMATS}
        return (
            shared
            + a_bytes * with_anchors
            + n * sum(SPECS[k].mem() if k in FORMATS else SPECS[k].mem for k in ks)
            + n * sum(FormatRoofline.mem(FORMATS[r]) for r in roofs)
        )

    groups, cur, cur_a = [], [], True

    def close():
        nonlocal cur, cur_a
        if cur:
            groups.append((cur, cur_a and bool(anchors)))
        cur, cur_a = [], True

    for fam in FAMILIES:
        members = [k for k in fam if k in keys]
        if not members:
            continue
        if (cur_a or fam[0] in NO_ANCHORS_OK) and cost(cur + members, cur_a) <= budget:
            cur += members
            continue
        close()
        if cost(members) <= budget:
            cur = list(members)
        elif fam[0] in NO_ANCHORS_OK and cost(members, False) <= budget:
            cur, cur_a = list(members), False
        else:  # the family does not fit: split it
            for k in members:
                if cost([k]) > budget:
                    too_big.append(k)
                elif cost(cur + [k]) <= budget:
                    cur.append(k)
                else:
                    close()
                    cur = [k]
    close()
    return groups, too_big, anchors


# ----------------------------------------------------------------------------- running


def _paired_min(nums, den):
    """Median over the rounds all ran of min(nums' times) / den's time, or None."""
    if (
        not den
        or "samples" not in den
        or not nums
        or any(not r or "samples" not in r for r in nums)
    ):
        return None
    by = [dict(zip(r["rounds"], r["samples"])) for r in nums]
    ratios = [
        min(b[rd] for b in by) / x
        for rd, x in zip(den["rounds"], den["samples"])
        if x > 0 and all(rd in b for b in by)
    ]
    return statistics.median(ratios) if ratios else None


def _stats(wl, threads, key, r, group, ngroups):
    spec = SPECS.get(key) or FORMATS[key.split(":", 1)[1]]
    bpe = spec.roof_bytes_per_elem if key.startswith("roofline:") else spec.bytes_per_elem
    rec = {
        "workload": wl.name,
        "workload_label": wl.label,
        "kind": wl.kind,
        "n_tensors": wl.n_tensors,
        "n_elems": wl.n_elems,
        "threads": threads,
        "impl": key,
        "label": _label(key),
        "row_kind": "roofline" if key.startswith("roofline:") else spec.kind,
        "bytes_per_elem": bpe,
        "group": group,
        "groups": ngroups,
    }
    if "error" in r:
        rec.update(status="error", note=r["error"])
        return rec
    v = r["samples"]
    q1, med, q3 = bench._quartiles(v)
    rec.update(
        status="ok",
        sec_per_step=med,
        sec_q1=q1,
        sec_q3=q3,
        sec_min=min(v),
        sec_max=max(v),
        iqr_rel=(q3 - q1) / med if med > 0 else None,
        batches=len(v),
        steps_per_batch=r["steps_per_batch"],
        warmup_steps=r["warmup_steps"],
        capped=r["capped"],
        samples=v,
        rounds=r["rounds"],
        elems_per_s=wl.n_elems / med,
        gbps=bpe * wl.n_elems / med / 1e9,
    )
    return rec


def run(s, torch, avail, progress_enabled=True):
    """Measure every cell (workload x threads); returns (records, notes)."""
    workloads = [bench.Workload.tensor(n) for n in s.sizes] + [
        bench.Workload.model(m) for m in s.models
    ]
    keys = [k for k in ROW_ORDER if k in avail and avail[k] is None]
    notes = []
    cells = [(t, w) for t in s.threads for w in workloads]
    prog = bench.Progress(len(cells), enabled=progress_enabled)
    mon = bench.CpuMonitor()
    records = []
    stand_in = False
    threads0 = torch.get_num_threads() if torch is not None else None
    try:
        for threads, wl in cells:
            first, t_cell = len(records), time.perf_counter()
            mon.others()
            prog.start_cell(f"formats {threads}T {wl.label}")
            if torch is not None:
                torch.set_num_threads(threads)
            need16 = any(SPECS[k].grad != "float32" for k in keys)
            shared = wl.n_elems * (4 + 2 * need16)
            groups, too_big, anchors = plan_groups(keys, wl.n_elems, s.max_memory, shared)
            skipped = {
                k: f"needs more than --max-memory {s.max_memory / 2**30:.1f} GiB" for k in too_big
            }
            data = Data(wl, s.seed, s.aligned, torch, need16)
            by_key = {}
            for gi, (group, with_anchors) in enumerate(groups):
                objs = []
                for key in (anchors if with_anchors else []) + group:
                    if key in skipped:
                        continue
                    try:
                        objs.append(_make(key, wl, data, threads, s.seed, s.aligned))
                    except Exception as e:  # MemoryError, an option fastadam lacks, ...
                        skipped[key] = f"error: {type(e).__name__}: {e}".splitlines()[0][:300]
                roofs = []
                if s.roofline:
                    for key in group:
                        if key in FORMATS and key not in skipped and FORMATS[key].roof not in roofs:
                            roofs.append(FORMATS[key].roof)
                    for r in roofs:
                        try:
                            o = FormatRoofline(FORMATS[r], wl.n_elems, threads, s.seed)
                            stand_in |= not o.exact
                            objs.append(o)
                        except Exception as e:
                            skipped[f"roofline:{r}"] = f"error: {type(e).__name__}: {e}"
                res = bench.measure_interleaved(
                    objs,
                    repeats=s.repeats,
                    batch_time=s.batch_time,
                    warm_time=s.warm_time,
                    max_time=s.max_time,
                    progress=prog,
                )
                resident = {}
                for o in objs:
                    if hasattr(o, "resident"):
                        try:
                            resident[o.key] = o.resident() / wl.n_elems
                        except Exception:
                            resident[o.key] = None
                objs = None
                gc.collect()
                for key, r in res.items():
                    rec = _stats(wl, threads, key, r, gi, len(groups))
                    if key in resident:
                        rec["resident_bytes_per_param"] = resident[key]
                    if key in FORMATS:
                        fmt = FORMATS[key]
                        rec["resident_declared"] = fmt.resident(wl.sizes) / wl.n_elems
                        rec["roofline_bytes_per_elem"] = fmt.roof_bytes_per_elem
                    if rec["status"] == "ok" and key in FORMATS:
                        roof = res.get(f"roofline:{FORMATS[key].roof}")
                        pr = bench._paired(roof, r)
                        rec["pct_roofline"] = 100.0 * pr if pr else None
                        rec["vs"] = {
                            k: bench._paired(res[k], r)
                            for k in res
                            if not k.startswith("roofline:")
                            and k != key
                            and k not in FORMATS
                            and "samples" in res[k]
                        }
                        base = [k for k in ANCHORS if k in res and "samples" in res[k]]
                        rec["fp32_best_of"] = base
                        rec["vs_fp32_best"] = _paired_min([res[k] for k in base], r)
                    by_key.setdefault(key, []).append(rec)
            for key in ROW_ORDER + [f"roofline:{k}" for k in FORMATS]:
                runs = by_key.get(key)
                if not runs:
                    continue
                if len(runs) == 1:
                    records.append(runs[0])
                    continue
                # measured in several groups (the anchors, a shared roofline): the median run
                ok = (
                    sorted(
                        [r for r in runs if r["status"] == "ok"], key=lambda r: r["sec_per_step"]
                    )
                    or runs
                )
                rec = dict(ok[len(ok) // 2])
                rec["group_sec_per_step"] = [r.get("sec_per_step") for r in runs]
                records.append(rec)
            for key, why in skipped.items():
                records.append(
                    {
                        "workload": wl.name,
                        "workload_label": wl.label,
                        "kind": wl.kind,
                        "n_tensors": wl.n_tensors,
                        "n_elems": wl.n_elems,
                        "threads": threads,
                        "impl": key,
                        "label": _label(key),
                        "status": "skipped",
                        "note": why,
                    }
                )
            del data
            gc.collect()
            others = mon.others()
            for rec in records[first:]:
                rec["cell_seconds"] = time.perf_counter() - t_cell
                rec["others_cpu"] = others
    finally:
        prog.done()
        if torch is not None and threads0:
            torch.set_num_threads(threads0)
    if stand_in:
        notes.append(
            "roofline: this fastadam has no _core.traffic yet; traffic_f32 over "
            "four float32 streams moving the format's bytes per element stands in"
        )
    return records, notes


def targets(records):
    """One row per (target, workload, threads) of the fastadam formats measured: the
    measured ratio, the threshold, met or not (None: not measured)."""
    rows = []
    for r in records:
        if r["impl"] not in FORMATS:
            continue
        base = dict(
            impl=r["impl"],
            label=r["label"],
            workload=r["workload"],
            workload_label=r["workload_label"],
            threads=r["threads"],
            others_cpu=r.get("others_cpu"),
        )
        ok = r["status"] == "ok"
        for kind, arg, thr in TARGETS.get(r["impl"], []):
            if kind == "speedup":
                val = r.get("vs_fp32_best") if ok else None
                what = f">= {thr:g}x the faster of " + " and ".join(
                    PEER_SPECS[k].short for k in (r.get("fp32_best_of") or ANCHORS)
                )
            else:
                val = (r.get("vs") or {}).get(arg) if ok else None
                what = f"faster than {PEER_SPECS[arg].short}"
            met = None if val is None else (val >= thr if kind == "speedup" else val > thr)
            rows.append(
                dict(
                    base,
                    metric="speedup" if kind == "speedup" else f"vs {arg}",
                    value=val,
                    target=what,
                    threshold=thr,
                    met=met,
                )
            )
        val = r.get("pct_roofline") if ok else None
        rows.append(
            dict(
                base,
                metric="pct_roofline",
                value=val,
                target=f">= {ROOF_TARGET:g}% of its own roofline",
                threshold=ROOF_TARGET,
                met=None if val is None else val >= ROOF_TARGET,
            )
        )
    return rows


# ----------------------------------------------------------------------------- output


def format_report(data):
    m, v, st = data["machine"], data["versions"], data["settings"]
    out = [
        (
            f"fastadam {v.get('fastadam')} bench --formats - {m.get('cpu_model')}, "
            f"{m.get('usable_cpus')} CPUs usable, caches {m.get('caches_per_cpu0') or '?'}"
        ),
        "python {python}, numpy {numpy}, torch {t}, deepspeed {ds}, bitsandbytes {bnb}, "
        "ml_dtypes {ml}".format(
            python=v.get("python"),
            numpy=v.get("numpy"),
            t=v.get("torch") or "-",
            ds=v.get("deepspeed") or "-",
            bnb=v.get("bitsandbytes") or "-",
            ml=v.get("ml_dtypes") or "-",
        ),
    ]
    if m.get("loadavg_start"):
        out.append(f"load average at start: {m['loadavg_start']}")
    hp = st.get("hyperparameters", {})
    out.append(
        f"AdamW lr={hp.get('lr')} betas={tuple(hp.get('betas', ()))} eps={hp.get('eps')} "
        f"weight_decay={hp.get('weight_decay')}; time per step: median over "
        f"{st.get('repeats')} interleaved batches; B/elem: bytes moved per element and "
        f"step; opt B/param: optimizer state (moments, master, absmax) per parameter; "
        f"% roof: the format's own roofline time / time; vs fp32: the faster of torch "
        f"fused and DeepSpeed fp32 / this row (per round)"
    )
    cols = [
        "implementation",
        "B/elem",
        "opt B/param",
        "time/step",
        "IQR",
        "GB/s",
        "% roof",
        "vs fp32",
    ]
    recs = data["results"]
    cells = list(dict.fromkeys((r["workload"], r["threads"]) for r in recs))
    order = {k: i for i, k in enumerate(DISPLAY_ORDER)}

    def key_order(r):
        k = r["impl"]
        if k.startswith("roofline:"):
            return (order.get(k.split(":", 1)[1], 99), 1)
        return (order.get(k, 99), 0)

    for w, th in cells:
        rs = sorted([r for r in recs if r["workload"] == w and r["threads"] == th], key=key_order)
        busy = max((r.get("others_cpu") or 0.0) for r in rs)
        rows = []
        for r in rs:
            if r["status"] != "ok":
                rows.append([r["label"], "", "", r["status"], "", "", "", r.get("note", "")])
                continue
            res = r.get("resident_bytes_per_param")
            pct, x = r.get("pct_roofline"), r.get("vs_fp32_best")
            rows.append(
                [
                    r["label"] + (" (capped)" if r.get("capped") else ""),
                    f"{r['bytes_per_elem']:.4g}",
                    "" if res is None else f"{res:.2f}",
                    bench._fmt_time(r["sec_per_step"]),
                    f"{100 * r['iqr_rel']:.1f}%" if r.get("iqr_rel") is not None else "-",
                    f"{r['gbps']:.1f}",
                    "" if pct is None else f"{pct:.0f}%",
                    "" if x is None else f"{x:.2f}x",
                ]
            )
        out.append("")
        out.append(
            f"== {rs[0]['workload_label']}{' !' if busy > bench.BUSY else ''}, "
            f"{th} thread{'s' if th != 1 else ''}"
        )
        out.append(bench._table(cols, rows, right={1, 2, 3, 4, 5, 6, 7}))
        vs_rows = [r for r in rs if r["impl"] in FORMATS and r.get("vs")]
        if vs_rows:
            peers = [
                k
                for k in DISPLAY_ORDER
                if k in PEER_SPECS and any(k in (r.get("vs") or {}) for r in vs_rows)
            ]
            vcols = ["fastadam format"] + [PEER_SPECS[k].short for k in peers]
            vrows = [
                [r["label"]] + [f"{r['vs'][k]:.2f}x" if r["vs"].get(k) else "" for k in peers]
                for r in vs_rows
            ]
            out.append(
                "   peer time / fastadam time (same group, per round; DS = DeepSpeed "
                "CPUAdam, params/state):"
            )
            out.append(
                "\n".join(
                    "   " + ln
                    for ln in bench._table(
                        vcols, vrows, right=set(range(1, len(vcols)))
                    ).splitlines()
                )
            )
    tg = data.get("targets") or []
    if tg:
        out.append("")
        out.append("== targets of issue 10 (out of cache: 1e8 and GPT-2 small; !: disturbed)")
        trows = []
        for t in tg:
            val = t["value"]
            shown = (
                "-"
                if val is None
                else f"{val:.0f}%"
                if t["metric"] == "pct_roofline"
                else f"{val:.2f}x"
            )
            trows.append(
                [
                    t["label"],
                    t["workload_label"] + (" !" if (t.get("others_cpu") or 0) > bench.BUSY else ""),
                    t["threads"],
                    shown,
                    t["target"],
                    "-" if t["met"] is None else ("yes" if t["met"] else "NO"),
                ]
            )
        out.append(
            bench._table(
                ["format", "workload", "threads", "measured", "target", "met"], trows, right={2, 3}
            )
        )
    notes = list(data.get("notes") or [])
    for k, why in (data.get("peers") or {}).items():
        if why is not None:
            notes.append(f"{_label(k)}: not measured: {why}")
    if any((r.get("others_cpu") or 0) > bench.BUSY for r in recs):
        notes.append(
            "!: other processes used the CPUs while this cell was measured: rerun "
            "on a quiet machine"
        )
    if notes:
        out.append("")
        out += [f"note: {n}" for n in notes]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


NOT_FOR_FORMATS = ("optimizer", "dtype", "impls", "plot", "numpy_all_threads", "slow_limit")


def resolve(args):
    """The settings of --formats (raises SystemExit with a message)."""
    import fastadam

    bad = [
        f"--{k.replace('_', '-')}"
        for k in NOT_FOR_FORMATS
        if getattr(args, k, None) not in (None, False)
    ]
    if args.simd not in (None, "auto"):
        bad.append("--simd")
    if bad:
        raise SystemExit(
            f"--formats: {', '.join(bad)} do(es) not apply (the rows are "
            f"chosen with --formats LIST)"
        )
    cfg = fastadam.config()
    s = bench.Settings()
    q = args.quick

    def pick(val, default, quick):
        return val if val is not None else (quick if q else default)

    sel = (args.formats or "all").strip().lower()
    if sel == "all":
        s.rows = list(ROW_ORDER)
    else:
        want = bench._parse_list(sel, str, "--formats")
        unknown = [k for k in want if k not in SPECS]
        if unknown or not want:
            raise SystemExit(
                f"--formats: unknown {unknown}; choose from {', '.join(DISPLAY_ORDER)} or all"
            )
        s.rows = [k for k in ROW_ORDER if k in want or k in ANCHORS]
    sizes = pick(args.sizes, "1e8", "1e5")
    s.sizes = (
        [] if sizes.strip().lower() == "none" else bench._parse_list(sizes, bench._size, "--sizes")
    )
    models = pick(args.models, "gpt2_small", "none").strip().lower()
    s.models = (
        []
        if models in ("none", "")
        else list(bench.MODELS)
        if models == "all"
        else bench._parse_list(models, str, "--models")
    )
    s.models = ["gpt2_small" if m in ("gpt2", "gpt-2") else m for m in s.models]
    unknown = [m for m in s.models if m not in bench.MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(bench.MODELS)}")
    if not s.sizes and not s.models:
        raise SystemExit("nothing to measure (--sizes none and --models none)")
    maxt = cfg["max_threads"] if cfg["openmp"] else 1
    th = pick(args.threads, "1,max", "1").strip().lower()
    s.threads = (
        list(range(1, maxt + 1))
        if th == "all"
        else bench._parse_list(th, lambda t: maxt if t == "max" else int(t), "--threads")
    )
    if any(t < 1 for t in s.threads):
        raise SystemExit("--threads: thread counts must be >= 1")
    s.threads = list(dict.fromkeys(s.threads))
    bench._timing_settings(s, args, pick, q)
    gib = (
        args.max_memory
        if args.max_memory is not None
        else min(6.0, 0.6 * bench._mem_available() / 2**30)
    )
    s.max_memory = int(gib * 2**30)
    s.quick, s.aligned, s.seed = q, args.aligned, args.seed
    return s


def _versions(torch):
    from importlib import metadata

    v = bench.versions(torch)
    for name in ("deepspeed", "bitsandbytes", "ml_dtypes"):
        try:
            v[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            v[name] = None
    return v


def main(args, argv):
    """``python -m fastadam bench --formats ...`` (args parsed by bench.build_parser)."""
    try:
        s = resolve(args)
    except (argparse.ArgumentTypeError, SystemExit) as e:
        print(f"error: {e or 'bad arguments'}", file=sys.stderr)
        return 2
    torch = bench._import_torch()
    t0 = time.time()
    machine = bench.machine_info()
    avail = {k: probe(k, torch) for k in s.rows}
    records, notes = run(s, torch, avail, progress_enabled=not args.quiet)
    machine["loadavg_end"] = bench._read("/proc/loadavg").strip()
    settings = {
        k: getattr(s, k)
        for k in (
            "rows",
            "sizes",
            "models",
            "threads",
            "roofline",
            "repeats",
            "batch_time",
            "max_time",
            "warm_time",
            "max_memory",
            "aligned",
            "quick",
            "seed",
        )
    }
    settings["argv"] = argv
    settings["hyperparameters"] = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}
    notes.append(
        "DeepSpeed engine: ZeRO-Offload's CPU step for a bf16 model, flat buffers "
        "(16-bit grads -> float32 buffer, CPUAdam on the float32 master, master -> "
        "16-bit params)"
    )
    data = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": time.time() - t0,
        "machine": machine,
        "versions": _versions(torch),
        "settings": settings,
        "notes": notes,
        "rows": {k: SPECS[k].as_json() for k in s.rows},
        "peers": {k: avail[k] for k in s.rows},
        "results": records,
        "targets": targets(records),
    }
    print(format_report(data), flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=bench._json_default)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
