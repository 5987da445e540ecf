"""Storage formats, specified exactly: 16-bit rounding, the random bits of stochastic
rounding, and 8-bit blockwise quantization (docs/formats.md says what a user sees).

The C core (csrc/formats.h) reproduces every function here bit for bit. Everything works
on bit patterns (uint16 for bfloat16 and float16, uint8 codes), so neither ml_dtypes nor
any hardware conversion is needed; the tests check that nearest rounding equals
``numpy.astype(numpy.float16)`` and ``ml_dtypes.bfloat16`` on every non-NaN value.

A formatted step (:func:`formatted_step`) is: widen every stored stream exactly to
float32, run the float32 rule (fastadam.reference.<rule>), then store every written
stream -- round to 16 bits, or re-quantize to 8 bits.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "Q8_BLOCK",
    "SIGNED_MAP",
    "SIGNED_THRESHOLDS",
    "UNSIGNED_MAP",
    "UNSIGNED_THRESHOLDS",
    "bf16_bits",
    "bf16_to_f32",
    "dequantize_blockwise",
    "dynamic_map",
    "f16_bits",
    "f16_to_f32",
    "formatted_step",
    "quantize_blockwise",
    "random_bits",
    "round_bits",
    "stream_key",
    "widen",
]

_M64 = (1 << 64) - 1
Q8_BLOCK = 256  # elements per 8-bit block (one float32 absmax each)


# ------------------------------------------------------------------ random bits
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_key(seed: int, index: int, step: int, stream: int) -> int:
    """The 64-bit key of one stream of one parameter at one step:
    splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ index) ^ step) ^ stream).
    index: the parameter's position in the optimizer; step: the step t being taken;
    stream: 0 for the parameter, 2 + k for state stream k."""
    k = _splitmix64(int(seed) & _M64)
    k = _splitmix64(k ^ (int(index) & _M64))
    k = _splitmix64(k ^ (int(step) & _M64))
    return _splitmix64(k ^ (int(stream) & _M64))


def _mix32(x):
    """murmur3's finaliser on uint32 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def random_bits(key: int, start: int, n: int) -> np.ndarray:
    """32 random bits for each element index i in [start, start + n) of a stream:
    mix32((mix32(lo(i) ^ lo(key)) + (hi(i) ^ hi(key))) mod 2**32), lo/hi the low and high
    32 bits. A pure function of (key, i): the same whichever thread or SIMD lane draws it."""
    i = np.arange(start, start + n, dtype=np.uint64)
    lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    k0 = np.uint32(key & 0xFFFFFFFF)
    k1 = np.uint32(key >> 32)
    with np.errstate(over="ignore"):
        return _mix32(_mix32(lo ^ k0) + (hi ^ k1))


# ------------------------------------------------------------------ 16-bit rounding
def _f32_bits(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def bf16_bits(x, rand=None) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16). rand None: round to nearest even; else
    stochastic with rand (uint32 per element): (bits + (rand >> 16)) >> 16. NaN ->
    (bits >> 16) | 0x0040 (quiet, sign and top payload kept)."""
    u = _f32_bits(x).astype(np.uint64)  # no wrap-around in the sums below
    if rand is None:
        r = u + 0x7FFF + ((u >> 16) & 1)
    else:
        r = u + (np.asarray(rand, dtype=np.uint32).astype(np.uint64) >> 16)
    out = (r >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x0040, out)
    return out.astype(np.uint16)


def f16_bits(x, rand=None) -> np.ndarray:
    """float32 -> IEEE float16 bit patterns (uint16). rand None: round to nearest even
    (numpy's astype); else stochastic: the dropped bits plus the top bits of rand (13 of
    them in the normal range; 14 to 31 in the subnormal range), then truncated; magnitudes
    below 2**-32 (a shift above 31) give zero. ``|x| >= 65536`` and inf -> inf; NaN ->
    sign | 0x7e00."""
    u = _f32_bits(x).astype(np.int64)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # normal float16 range: drop 13 bits after rebiasing the exponent (127 - 15 = 112)
    if rand is None:
        inc_n = 0xFFF + ((a >> 13) & 1)
    else:
        rand = np.asarray(rand, dtype=np.uint32).astype(np.int64)
        inc_n = rand >> 19
    normal = (a - 0x38000000 + inc_n) >> 13
    # subnormal float16 range: value / 2**-24 = m * 2**(e - 126), shift = 126 - e >= 14
    e = a >> 23
    shift = np.clip(126 - e, 14, 31)
    m = (a & 0x7FFFFF) | 0x800000
    if rand is None:
        inc_s = (np.int64(1) << (shift - 1)) - 1 + ((m >> shift) & 1)
    else:
        inc_s = rand >> (32 - shift)
    sub = np.where(126 - e > 31, 0, (m + inc_s) >> shift)
    out = np.where(a >= 0x38800000, np.minimum(normal, 0x7C00), sub)
    out = np.where(a >= 0x47800000, 0x7C00, out)
    out = np.where(a > 0x7F800000, 0x7E00, out)
    return (out | sign).astype(np.uint16)


def bf16_to_f32(bits) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def f16_to_f32(bits) -> np.ndarray:
    """IEEE float16 bit patterns -> float32 (exact)."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def round_bits(fmt: str, x, rand=None) -> np.ndarray:
    """Store float32 values as fmt ("bf16" or "f16") bit patterns."""
    return bf16_bits(x, rand) if fmt == "bf16" else f16_bits(x, rand)


def widen(fmt: str, bits) -> np.ndarray:
    return bf16_to_f32(bits) if fmt == "bf16" else f16_to_f32(bits)


# ------------------------------------------------------------------ 8-bit blockwise
def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for
    i = 0..6, the midpoints of linspace(0.1, 1, 2**i + 1) (signed; 2**(i+1) + 1 unsigned)
    times 10**(i - 6), and their negatives when signed; then 0 and 1. Computed in double,
    rounded once to float32, sorted: 256 values."""
    data = []
    for i in range(7):
        k = 2**i + 1 if signed else 2 ** (i + 1) + 1
        b = np.linspace(0.1, 1.0, k, dtype=np.float64)
        means = (b[:-1] + b[1:]) / 2.0
        data += list(10.0 ** (i - 6) * means)
        if signed:
            data += list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    assert len(data) == 256
    return np.sort(np.array(data, dtype=np.float64).astype(np.float32))


SIGNED_MAP = dynamic_map(True)
UNSIGNED_MAP = dynamic_map(False)
# The float32 midpoints between consecutive codes: the index of x is how many are < x.
SIGNED_THRESHOLDS = ((SIGNED_MAP[:-1] + SIGNED_MAP[1:]) * np.float32(0.5)).astype(np.float32)
UNSIGNED_THRESHOLDS = ((UNSIGNED_MAP[:-1] + UNSIGNED_MAP[1:]) * np.float32(0.5)).astype(np.float32)
for _m in (SIGNED_MAP, SIGNED_THRESHOLDS, UNSIGNED_MAP, UNSIGNED_THRESHOLDS):
    _m.flags.writeable = False


def quantize_blockwise(x, signed: bool):
    """float32 values -> (codes uint8, absmax float32 per block of Q8_BLOCK elements).

    Per block: absmax = ``max |x|`` (NaN if any element is NaN); q = x / d in float32 with
    d = 1 where absmax == 0, else absmax; code = the number of thresholds < q (NaN q: 0),
    the nearest code. One exception, unsigned map only: a q > 0 below the first threshold
    stores as code 1 (the smallest positive value, 3.25e-7 * absmax), not 0. Unsigned
    states are denominators (second moments, AdaGrad's sum, Adamax's exp_inf): rounded to
    0 while the numerator survives, they would turn m / (sqrt(v) + eps) into a step of up
    to m / eps; stored as the smallest code they can only shrink the step."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    nblocks = -(-n // Q8_BLOCK)
    pad = np.zeros(nblocks * Q8_BLOCK, dtype=np.float32)
    pad[:n] = x
    blocks = pad.reshape(nblocks, Q8_BLOCK)
    with np.errstate(invalid="ignore", divide="ignore"):
        absmax = np.max(np.abs(blocks), axis=1).astype(np.float32)  # NaN propagates
        absmax = np.where(np.isnan(absmax), np.float32(np.nan), absmax).astype(np.float32)
        d = np.where(absmax == 0, np.float32(1), absmax).astype(np.float32)
        q = (blocks / d[:, None]).astype(np.float32).reshape(-1)[:n]
    thresholds = SIGNED_THRESHOLDS if signed else UNSIGNED_THRESHOLDS
    codes = np.searchsorted(thresholds, q, side="left")
    if not signed:
        codes = np.where(q > 0, np.maximum(codes, 1), codes)
    codes = np.where(np.isnan(q), 0, codes).astype(np.uint8)
    return codes, absmax


def dequantize_blockwise(codes, absmax, signed: bool) -> np.ndarray:
    """codes uint8 (n,), absmax float32 (ceil(n/256),) -> float32: code_map[c] * absmax."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    m = (SIGNED_MAP if signed else UNSIGNED_MAP)[codes]
    scale = np.repeat(np.asarray(absmax, dtype=np.float32), Q8_BLOCK)[: codes.size]
    return (m * scale).astype(np.float32)


# ------------------------------------------------------------------ formatted step
def _load(fmt, a, absmax=None):
    if fmt in (None, "f32"):
        return np.array(a, dtype=np.float32)
    if fmt in ("bf16", "f16"):
        return widen(fmt, np.asarray(a).view(np.uint16))
    return dequantize_blockwise(a, absmax, fmt == "q8s").reshape(np.shape(a))


def formatted_step(
    update,
    param,
    grad,
    states,
    *,
    formats,
    step,
    master=None,
    absmax=None,
    stochastic=False,
    seed=0,
    index=0,
    ema=None,
    ema_decay=None,
):
    """One step of a float32 rule over formatted storage, in place; returns what
    update returns.

    update(param32, grad32, states32) runs the float32 reference rule (e.g. a closure over
    fastadam.reference.adam_step) on float32 arrays; states32 has one float32 array (or
    None) per state stream. param: float32, or 2-byte (bfloat16/float16 bits) viewed as
    uint16. formats: dict with "param", "grad" and "states" (one per state stream), each
    "f32", "bf16", "f16", "q8s" (signed 8-bit) or "q8u" (unsigned 8-bit). master: None,
    or the float32 master weights (the rule updates them; param becomes their rounded
    image). absmax: one float32 array (or None) per state stream. ema: the float32
    param_ema, updated after the rule with ema_decay. Random bits of stochastic rounding:
    stream 0 for the parameter, 2 + k for state stream k."""
    nstate = len(states)
    absmax = absmax or [None] * nstate
    pf = formats["param"]
    grad32 = _load(formats.get("grad", "f32"), grad)
    work = master if master is not None else _load(pf, param)
    s32 = [
        _load(formats["states"][k], states[k], absmax[k]) if states[k] is not None else None
        for k in range(nstate)
    ]
    out = update(work, grad32, s32)
    if ema is not None:
        from .ema import ema_update

        ema_update(ema, work, ema_decay)
    n = work.size

    def rand(stream):
        if not stochastic:
            return None
        return random_bits(stream_key(seed, index, int(step), stream), 0, n)

    if pf in ("bf16", "f16"):
        param.reshape(-1).view(np.uint16)[:] = round_bits(pf, work.reshape(-1), rand(0))
    elif master is None:
        param[...] = work
    for k in range(nstate):
        if states[k] is None:
            continue
        f = formats["states"][k]
        sk = s32[k]
        assert sk is not None  # loaded above for every state that is not None
        flat = sk.reshape(-1)
        if f in (None, "f32"):
            states[k][...] = sk
        elif f in ("bf16", "f16"):
            states[k].reshape(-1).view(np.uint16)[:] = round_bits(f, flat, rand(2 + k))
        else:
            codes, am = quantize_blockwise(flat, f == "q8s")
            states[k].reshape(-1)[:] = codes
            absmax[k][:] = am
    return out


def c_header() -> str:
    """csrc/formats/q8_maps.h: the two maps as C hex-float literals (generated from this
    module; tests/test_formats.py checks that the committed file equals it)."""
    lines = [
        "/* q8_maps.h -- GENERATED by fastadam.reference.formats.c_header(); do not edit.",
        " * bitsandbytes' dynamic maps (create_dynamic_map), computed in double and rounded",
        " * once to float32, sorted: fa_q8_maps[0] signed, fa_q8_maps[1] unsigned. */",
        "#ifndef FA_Q8_MAPS_H",
        "#define FA_Q8_MAPS_H",
        "static const float fa_q8_maps[2][256] = {",
    ]
    for m in (SIGNED_MAP, UNSIGNED_MAP):
        vals = [float(v).hex() + "f" if v != 0 else "0.0f" for v in m]
        lines.append("    {")
        for i in range(0, 256, 4):
            lines.append("        " + ", ".join(vals[i : i + 4]) + ",")
        lines.append("    },")
    lines += ["};", "#endif", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fastadam.reference.formats > csrc/formats/q8_maps.h
    print(c_header(), end="")
