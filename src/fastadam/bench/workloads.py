"""What is stepped: the hyperparameters every row uses, the bytes per element, the
workloads (single tensors of n elements and model-shaped sets: GPT-2 small, ResNet-50,
1000 x 1000) and the buffers they are filled into.
"""

from __future__ import annotations

import math

import numpy as np

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8
BYTES_PER_ELEM = {"float32": 28, "float64": 56}

# ----------------------------------------------------------------------------- workloads


def gpt2_small_shapes():
    """Parameter shapes of GPT-2 small (Hugging Face GPT2LMHeadModel; lm_head is tied to
    wte): 148 tensors, 124,439,808 parameters."""
    d, n_layer, vocab, n_ctx = 768, 12, 50257, 1024
    shapes = [(vocab, d), (n_ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,),
            (d,),  # ln_1 weight, bias
            (d, 3 * d),
            (3 * d,),  # attn.c_attn (Conv1D: in x out)
            (d, d),
            (d,),  # attn.c_proj
            (d,),
            (d,),  # ln_2
            (d, 4 * d),
            (4 * d,),  # mlp.c_fc
            (4 * d, d),
            (d,),
        ]  # mlp.c_proj
    return shapes + [(d,), (d,)]  # ln_f


def resnet50_shapes():
    """Parameter shapes of torchvision's resnet50 (Bottleneck blocks [3, 4, 6, 3]; BatchNorm
    weight and bias are parameters, running statistics are not): 161 tensors, 25,557,032
    parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [
                (planes, inplanes, 1, 1),
                (planes,),
                (planes,),
                (planes, planes, 3, 3),
                (planes,),
                (planes,),
                (planes * 4, planes, 1, 1),
                (planes * 4,),
                (planes * 4,),
            ]
            if b == 0:  # downsample: 1x1 conv + bn
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]  # fc


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
        e = math.floor(math.log10(n))
        for ee in (e, e - 1):
            mant = n / 10**ee
            if mant == int(mant) and mant < 10:
                return f"{int(mant)}e{ee}" if mant != 1 else f"1e{ee}"
    return str(n)


# ----------------------------------------------------------------------------- buffers


def _aligned(shape, dtype):
    from ..optim import aligned_zeros

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
        pat = self.tile2[o : o + T]
        n = flat.size
        head = n // T * T
        if head:
            flat[:head].reshape(-1, T)[...] = pat
        flat[head:] = pat[: n - head]
        return a
