"""fastadam.torch: drop-ins for ``torch.optim`` on the fused fastadam C core.

``Adam``, ``AdamW``, ``SGD``, ``Adagrad``, ``RMSprop``, ``Adamax``, ``NAdam`` and ``RAdam``
replace the torch.optim classes of the same names, and ``Lion`` (Chen et al. 2023, not in
torch.optim) comes in the same style. Switch by changing one import::

    from fastadam.torch import Adam          # instead of: from torch.optim import Adam
    opt = Adam(model.parameters(), lr=1e-3)  # same signature, defaults, state and checkpoints

Every step is ONE call into C over all parameters (one per dtype when a model mixes
float32 and float64): the parameters and torch's own state tensors (``exp_avg``,
``momentum_buffer``, ``sum``, ...) are updated in place through zero-copy NumPy views of
their memory; nothing is copied to or from NumPy. The arithmetic is the rule's
specification in ``fastadam.reference`` (bit for bit), which agrees with
``torch.optim.X(foreach=False)`` to within about an ulp per step.

float16 and bfloat16 parameters (with float32 master weights or not) and bfloat16 or
8-bit blockwise state are the storage formats of docs/formats.md: keyword-only
``master_weights``, ``state_dtype``, ``rounding`` and ``seed`` on every class (see
:class:`Optimizer`).

``import fastadam`` never imports torch; this module does.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import zlib
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch as _torch
from torch.optim import Optimizer as _Optimizer

from fastadam import _core, _formats, _sync
from fastadam._options import (
    changed,
    check_ema_decay,
    check_grad_scale,
    check_max_norm,
    check_threads,
)
from fastadam._rules import RULES

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch.optim.optimizer import ParamsT

    from fastadam._rules import Rule

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "NAdam",
    "RAdam",
    "RMSprop",
    "full_optim_state_dict",
    "load_full_optim_state_dict",
]

_Tensor = _torch.Tensor
_STRIDED = _torch.strided
# parameter dtype -> (the dtype of the plan that updates it, viewed as real?)
_SUPPORTED = {
    _torch.float32: ("float32", False),
    _torch.float64: ("float64", False),
    _torch.complex64: ("float32", True),
    _torch.complex128: ("float64", True),
    _torch.float16: ("float32", False),
    _torch.bfloat16: ("float32", False),
}
# 16-bit parameters: their float32-compute plan sees them (and their 16-bit gradients and
# state) as int16 views, since torch cannot .numpy() a bfloat16 tensor
_HALF = {_torch.float16: "float16", _torch.bfloat16: "bfloat16"}
# the dtype name _formats decides a parameter's storage from (complex: its real view)
_NAMES = {
    _torch.float32: "float32",
    _torch.float64: "float64",
    _torch.complex64: "float32",
    _torch.complex128: "float64",
    _torch.float16: "float16",
    _torch.bfloat16: "bfloat16",
}
_FMT_DTYPES = {"bfloat16": _torch.bfloat16, "float16": _torch.float16, "uint8": _torch.uint8}
_DEFAULT_FORMATS = _formats.Formats()
_COUNT_DTYPES = (_torch.float32, _torch.float64, _torch.int64)  # what a count mirror may be


def _scalar(x):
    """A hyperparameter as a Python number (torch allows 1-element tensors). Other
    tensors (several elements, complex, meta) are returned as they are, for the checks
    to refuse."""
    if isinstance(x, _Tensor) and x.numel() == 1 and not x.is_complex() and x.device.type != "meta":
        return x.item()
    return x


_PLAIN = frozenset((float, int, bool, str, type(None)))


def _key(x):
    """_scalar, with a fast path for plain Python values (the option keys of a step)."""
    return x if x.__class__ in _PLAIN else _scalar(x)


def _step_dtype():
    # torch.optim's _get_scalar_dtype() (not fused, not capturable): the dtype of
    # state['step'] (and NAdam's mu_product): float32, float64 if that is the default
    return _torch.float64 if _torch.get_default_dtype() == _torch.float64 else _torch.float32


def _describe(p):
    if _is_dtensor(p):
        return (
            f"a {tuple(p.shape)} {str(p.dtype).replace('torch.', '')} DTensor "
            f"({_placements(p)}, local shard {tuple(p._local_tensor.shape)}) on {p.device}"
        )
    return f"a {tuple(p.shape)} {str(p.dtype).replace('torch.', '')} tensor on {p.device}"


# ------------------------------------------------------------------ DTensor (FSDP2)
# A DTensor parameter (torch.distributed.tensor, what FSDP2's fully_shard makes) is updated
# through its local shard: the plan views the local tensor's memory (the DTensor's own
# data_ptr() is 0 and .numpy() refuses it), and its state tensors are DTensors laid out like
# it, so that torch.distributed.checkpoint saves and reshards them. The module is looked up
# in sys.modules rather than imported: importing it costs about a second, and no DTensor
# can exist before it is imported.
_DTENSOR = None


def _is_dtensor(t):
    global _DTENSOR
    if _DTENSOR is None:
        mod = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(mod, "DTensor", None)
        if _DTENSOR is None:
            return False
    return isinstance(t, _DTENSOR)


def _local(t):
    """The tensor whose memory fastadam reads and writes: a DTensor's local shard (its
    ``_local_tensor``: to_local() would make a new autograd view at every call), else t."""
    return t._local_tensor if _is_dtensor(t) else t


def _placements(t):
    return ", ".join(map(str, t.placements)) + f" on a {tuple(t.device_mesh.shape)} mesh"


def _ptrs(tensors, dtensors):
    """The data pointers the plans were built on (a DTensor's: its local shard's)."""
    if not dtensors:
        return list(map(_data_ptr, tensors))
    return [_local(t).data_ptr() for t in tensors]


def _check_param(p, where):
    """Raise a clear error unless fastadam can update p in place."""
    if not isinstance(p, _Tensor):
        raise TypeError(f"{where}: optimizer can only optimize Tensors, got {type(p).__name__}")
    if _is_dtensor(p):
        if any(pl.is_partial() for pl in p.placements):
            raise ValueError(
                f"{where} is {_describe(p)}: a parameter cannot have a Partial "
                f"placement (its local shards are not its values)"
            )
        if not p._local_tensor.is_contiguous():
            raise ValueError(
                f"{where} is {_describe(p)} whose local shard is not contiguous "
                f"(strides {p._local_tensor.stride()}); fastadam.torch updates "
                f"contiguous shards in place"
            )
    if p.layout is not _STRIDED:
        raise ValueError(
            f"{where} is a {p.layout} tensor; fastadam.torch updates dense (strided) CPU tensors"
        )
    if p.device.type != "cpu":
        raise ValueError(
            f"{where} is {_describe(p)}; fastadam.torch updates parameters in "
            f"CPU memory (keep the model, or an fp32 master copy of its "
            f"parameters, on the CPU)"
        )
    if p.dtype not in _SUPPORTED:
        raise TypeError(
            f"{where} is {_describe(p)}; fastadam.torch supports float32, "
            f"float64, float16 and bfloat16 parameters (and complex64/"
            f"complex128, viewed as real)"
        )
    if not _local(p).is_contiguous():
        raise ValueError(
            f"{where} is {_describe(p)} that is not contiguous (strides "
            f"{p.stride()}); fastadam.torch updates contiguous parameters in "
            f"place (make it contiguous before building the optimizer)"
        )


def _number(name, x):
    """A number or a 1-element tensor (as torch allows for grad_scale and found_inf) as a
    Python number; anything else is a TypeError naming the argument."""
    if isinstance(x, _Tensor):
        if x.numel() != 1 or x.is_complex() or x.device.type == "meta":
            raise TypeError(
                f"{name} must be a number or a 1-element real tensor, got {_describe(x)}"
            )
        return x.item()
    if isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)):
        return x
    raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(x).__name__}")


def _view(t):
    """Zero-copy NumPy view of a CPU tensor's memory (complex viewed as real, float16 and
    bfloat16 as int16: the plan knows each block's format); of a DTensor, its local shard's."""
    t = _local(t)
    if t.requires_grad:
        t = t.detach()
    if t.is_complex():
        t = _torch.view_as_real(t)
    elif t.dtype in _HALF:
        t = t.view(_torch.int16)
    return t.numpy()


def _is_mirror(t, dtypes):
    """t can be a count or scalar mirror as it is: a 0-dim contiguous dense CPU tensor of
    one of `dtypes`, outside autograd."""
    return (
        isinstance(t, _Tensor)
        and t.dim() == 0
        and t.device.type == "cpu"
        and t.layout is _STRIDED
        and t.dtype in dtypes
        and not t.requires_grad
        and t.is_contiguous()
    )


def _state_number(v, key, where):
    """The value of a per-parameter number of the state (``step``, ``mu_product``,
    ``param_ema_step``) as a float: a number or a 1-element real dense CPU tensor."""
    if isinstance(v, _Tensor):
        if v.numel() != 1 or v.is_complex() or v.device.type != "cpu" or v.layout is not _STRIDED:
            raise ValueError(
                f"state[{key!r}] of {where} must be a number or a 1-element "
                f"real dense CPU tensor, got {_describe(v)}"
            )
        value = v.item()
    elif isinstance(v, (numbers.Real, np.generic)) and not isinstance(v, (bool, np.bool_)):
        value = v
    else:
        raise TypeError(
            f"state[{key!r}] of {where} must be a number or a 1-element tensor, "
            f"got {type(v).__name__}"
        )
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"state[{key!r}] of {where} must be a real number, got {v!r}") from None


def _step_value(step, where):
    """The count in state['step'] as a float, if torch could step from it and fastadam
    will: a number or 1-element tensor, >= 0 (inf included), not NaN."""
    value = _state_number(step, "step", where)
    if not value >= 0.0:
        raise ValueError(f"state['step'] of {where} must be >= 0, got {value}")
    return value


def _unit_value(v, key, where):
    """A per-parameter scalar of the state in [0, 1] (NAdam's mu_product)."""
    value = _state_number(v, key, where)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"state[{key!r}] of {where} must be in [0, 1], got {value}")
    return value


def _count_value(v, key, where):
    """A count of the state (param_ema_step): a whole number, 0 <= count < 2**62 - 1."""
    value = _state_number(v, key, where)
    if not (0.0 <= value < 2.0**62 - 1 and value == math.floor(value)):
        raise ValueError(
            f"state[{key!r}] of {where} must be a whole number >= 0 and < 2**62 - 1, got {value}"
        )
    return int(value)


class _Cache:
    """The plans of one optimizer and what they were built from. A step reuses them
    while every parameter, every state dict and every state tensor is still the same
    object with the same data pointer; it checks that with identity comparisons and
    one data_ptr() per tensor (the storages are held, so an address cannot be reused
    by another allocation while the plans point at it)."""

    __slots__ = (
        "dtensors",
        "ids",
        "inner_ids",
        "needs",
        "plans",
        "ptrs",
        "reduce",
        "shapes",
        "slots",
        "state",
        "state_ids",
        "storages",
        "tensors",
        "unsynced",
    )

    def __init__(self):
        self.ids = []  # id() of every parameter, in param-group order
        self.tensors = []  # every parameter, then every state tensor the plans use
        self.ptrs = []  # their data_ptr() when the plans were built
        self.storages = []  # their storages, held so that their memory stays put
        self.slots = []  # (plan, block, complex), or None for a parameter without state
        self.plans = []  # one _core._Plan per element dtype
        self.needs = ()  # each group's (state streams its options need, ema?) when built
        self.state = None  # the optimizer's state dict object
        self.state_ids = []  # id() of each per-parameter state dict, in order
        self.inner_ids = []  # id() of every value in them (the state tensors), in order
        self.shapes = []  # every parameter's shape when built
        self.unsynced = []  # (parameter, master_param, step) of masters not stepped yet
        self.dtensors = False  # some tensor is a DTensor: pointers are its local shard's
        self.reduce = []  # global norm: [(mesh, sharded mesh dims, [(plan, block, fmt)])]


class _Lists:
    """The _Plan arguments of one dtype, gathered parameter by parameter."""

    __slots__ = (
        "absmaxes",
        "counts",
        "ema_steps",
        "emas",
        "formats",
        "fresh",
        "groups",
        "indices",
        "labels",
        "masters",
        "params",
        "plain",
        "scalars",
        "slots",
        "states",
        "steps",
    )

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, [])
        self.plain = True  # every block float32/float64 with native state: formats=None


_MISSING = object()


def _quantize(x, signed):
    """The 8-bit blockwise (codes, absmax) of the float32 values x, as
    fastadam.reference.formats specifies (imported when 8-bit state is made)."""
    from fastadam.reference import formats

    codes, absmax = formats.quantize_blockwise(x, signed)
    return (
        np.ascontiguousarray(codes, np.uint8).reshape(-1),
        np.ascontiguousarray(absmax, np.float32).reshape(-1),
    )


def _blocks(n):
    """The number of blocks (one absmax each) of an n-element 8-bit stream."""
    return -(-n // _formats.Q8_BLOCK)


def _q8_layout(p):
    """The 8-bit absmax layout of a DTensor parameter p: (L, global length, placements).
    The C core's blocks are 256 consecutive elements of the LOCAL shard, so a rank's absmax
    is one per block of its own shard. Stored as a 1-D DTensor on p's mesh, Shard(0) over
    the mesh dims p is sharded on (Replicate elsewhere: those ranks hold the same shard),
    of global length world * L, every rank holding exactly L entries (torch.chunk of an
    evenly divisible length); a rank uses its first ceil(n_local / 256), the rest stay 0.
    L = max over ranks of ceil(n_local / 256), from p's global shape and placements alone
    (the same on every rank, no communication): a Shard is torch.chunk's split, whose first
    chunk is the largest along each dim, so the rank at mesh coordinate 0 has the largest
    local shard.

    Each rank's region ends with one more entry, the layout stamp: minus a 24-bit hash of
    p's global shape, the mesh's shape and p's placements (never an absmax: those are >= 0
    or NaN). DCP refuses a checkpoint whose absmax has another global length; the stamp
    catches a reshard that happens to give the same length (2 shards of 500 elements and 1
    of 1000 both need 4 entries), which would pair codes with the wrong blocks' scales.
    Returns (L, global length world * (L + 1), placements, stamp)."""
    from torch.distributed.tensor import Replicate, Shard

    shape, world, placements = list(p.shape), 1, []
    for i, pl in enumerate(p.placements):
        if pl.is_shard():
            k = p.device_mesh.size(i)
            shape[pl.dim] = -(-shape[pl.dim] // k)
            world *= k
            placements.append(Shard(0))
        else:
            placements.append(Replicate())
    L = _blocks(math.prod(shape))
    layout = repr((tuple(p.shape), tuple(p.device_mesh.mesh.shape), tuple(map(str, p.placements))))
    stamp = -float(zlib.crc32(layout.encode()) % (1 << 24) or 1)  # exact in float32
    return L, world * (L + 1), tuple(placements), stamp


def _absmax_view(a, p):
    """The NumPy view of the absmax the C core uses for p: of a DTensor parameter, the
    first ceil(n_local / 256) entries of the local absmax (a contiguous view)."""
    if _is_dtensor(p):
        return _view(a)[: _blocks(_local(p).numel())]
    return _view(a)


def _holds_dtensor(state):
    """Some value of some entry of a state_dict's 'state' is a DTensor."""
    return isinstance(state, dict) and any(
        isinstance(entry, dict) and any(map(_is_dtensor, entry.values()))
        for entry in state.values()
    )


def _clipped_scale(norm, max_norm, scale):
    """The loss scale that clips to max_norm a step whose global gradient norm is `norm`:
    as the fused single-process pass (_core), scale / coefficient when the coefficient
    max_norm / (norm + 1e-6) is below 1. A non-finite norm makes the coefficient 0 there
    (the gradients multiplied by 0); here the largest finite scale, which the C core
    accepts (its multiplier 1/scale rounds to 0 in float32; 5.6e-309 in float64)."""
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:  # not for a NaN norm: as _core, no clipping then
        scale = scale / coef if coef > 0.0 else math.inf
        if not scale < math.inf:
            scale = sys.float_info.max
    return scale


def _sum_over_mesh(mesh, dims, sumsq, nonfinite):
    """(sum, any) of (sumsq, nonfinite) over the ranks of `mesh` along `dims`: gathered
    (all_gather, not all_reduce, so that the sum is taken in rank order, the same bits on
    every rank), in a tensor on the mesh's device type, which its process group expects
    (a CUDA mesh with CPU-offloaded shards talks NCCL; tested on CPU meshes only)."""
    import torch.distributed as dist

    t = _torch.tensor([sumsq, float(nonfinite)], dtype=_torch.float64, device=mesh.device_type)
    for d in dims:
        group = mesh.get_group(d)
        parts = [_torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        t = parts[0].clone()
        for q in parts[1:]:
            t += q
    sumsq, bad = t.tolist()
    return sumsq, bad != 0.0


class _SparseGradientError(TypeError, RuntimeError):
    """torch.optim raises RuntimeError for a sparse gradient; this is also a TypeError,
    as every other refused input of fastadam."""


_shape_of = operator.attrgetter("shape")
_data_ptr = _Tensor.data_ptr


def _state_ids(state):
    values = list(state.values())
    inner = []
    for v in values:
        if isinstance(v, dict):
            inner.extend(map(id, v.values()))
    return list(map(id, values)), inner


def _unset(value, default):
    """value is the extra option's default (so it is left out of the param groups)."""
    if value is default:
        return True
    numeric = (int, float)
    return type(value) in numeric and type(default) in numeric and value == default


class Optimizer(_Optimizer):
    r"""The torch drop-ins' shared engine: a ``torch.optim.Optimizer`` whose step is one
    fused C call (one per dtype) over every parameter, for the update rule named by
    ``_rule`` (see fastadam._rules). Subclasses give the constructor torch.optim's
    signature and declare the group keys; everything below is the same for every rule.

    Same ``param_groups``, ``state`` and ``state_dict()`` as the torch.optim class, so it
    works with ``torch.optim.lr_scheduler``, hooks, ``torch.amp.GradScaler``, checkpoints
    written by (or for) torch.optim and ``torch.distributed.optim.ZeroRedundancyOptimizer``.
    Parameters must be dense, contiguous CPU tensors of dtype float32, float64, float16 or
    bfloat16 (complex64/complex128 are updated as pairs of reals, as torch does). Each
    ``step()`` updates every parameter whose ``.grad`` is not None with one call into C
    (one per compute dtype: float32, float16 and bfloat16 parameters share the float32
    one, float64 ones have their own), in place; parameters whose ``.grad`` is None are
    skipped exactly as torch skips them (their state and step count do not move).

    Common keyword-only parameters (fastadam extras, after torch's own):
        max_grad_norm (float or None): clip the global L2 norm of all gradients of this
            optimizer to it, as ``torch.nn.utils.clip_grad_norm_`` before the step would,
            but fused: one read pass computes the norm (in double, the same bits for every
            thread count), the coefficient is folded into the update and the ``.grad``
            tensors are not modified. The norm before clipping is left in
            ``last_grad_norm``. Under ZeroRedundancyOptimizer each rank sees only its
            shard, so clip with ``torch.nn.utils.clip_grad_norm_`` there instead. Over
            DTensor (FSDP2) parameters it is the norm of the whole model: see below.
        num_threads (int or None): OpenMP threads per step (None: OpenMP's default,
            ``OMP_NUM_THREADS``; else 1 to 2**31 - 1). The result is the same bits for every
            value.
        ema_decay (float in [0, 1) or None): also keep the temporal average of every
            parameter (Kingma & Ba, Sec. 7.2), ``param_ema <- d*param_ema + (1-d)*param``
            from 0, in the same pass. A group option (in ``param_groups`` only when set);
            the state then also holds ``param_ema`` (a tensor like the parameter) and
            ``param_ema_step`` (a 0-dim int64 tensor, its update count);
            :meth:`averaged_params` returns the bias-corrected averages. It never changes
            the optimizer's own trajectory.

    Storage formats (keyword-only, optimizer-wide; docs/formats.md is the contract):
        master_weights (bool, default False): keep a float32 copy of every float16/bfloat16
            parameter, ``state[p]['master_param']``, made from the parameter at its first
            step; the rule updates the master and, in the same pass, writes the parameter
            as its rounded image, so the master follows bit for bit the float32 trajectory
            of the rule fed the widened gradients. Writes to the 16-bit parameter after its
            first step are overwritten by the next one (load weights into ``master_param``).
            ValueError if the optimizer has no 16-bit parameter.
        state_dtype (None, float32, bfloat16 or "8bit"; torch or NumPy dtypes or names): the
            storage of the rule's state tensors. None: the parameter's dtype (float32 for a
            16-bit parameter with master weights), as torch.optim. "8bit": bitsandbytes'
            blockwise format, uint8 codes under torch's names (``exp_avg``, ...) plus a
            float32 ``<name>_absmax`` per 256 elements; tensors of fewer than 4096 elements
            keep float32 state. Complex parameters keep their own dtype; float64 parameters
            allow None (TypeError otherwise).
        rounding ("nearest" or "stochastic") and seed (int in [0, 2**64)): how every stored
            16-bit value is rounded; stochastic rounding draws its bits from (seed, the
            parameter's index over all param groups, step, stream, element), the same for
            every thread count and after a resume (SGD and Lion then keep a ``step`` in
            their state, as the other rules do).

    Each step widens every stored value exactly to float32, runs the float32 rule and
    rounds (or re-quantizes) each value once on store; the parameter moves by the float32
    moments, not by their stored images. The gradients of a 16-bit parameter have its
    dtype (torch's rule; another dtype is a TypeError). ``param_ema`` of a 16-bit parameter
    is float32. ``state_dict()`` adds ``"formats"`` (the four options) unless they are the
    defaults; ``load_state_dict`` refuses another optimizer's formats, checks every
    state tensor's dtype and shape, and keeps the saved dtypes (torch's own loader would
    cast a 16-bit parameter's float32 master and 8-bit codes to its dtype). Under
    ZeroRedundancyOptimizer each rank numbers the parameters of its own shard, so
    stochastic rounding draws other bits than one process would (nearest rounding gives
    the same bits).

    ``foreach`` and ``fused`` are accepted for compatibility and have no effect: fastadam
    always runs its own fused, multithreaded pass. ``capturable`` and ``differentiable``
    must be False (CUDA graphs and differentiating through the step are not supported:
    NotImplementedError).

    The hyperparameters torch checks are refused with torch's exception types and
    messages (``ValueError: Invalid learning rate: -1.0``, ...); fastadam also refuses
    non-finite ones. Every other error names the parameter by its param group and its
    index in that group.

    ``step(closure=None, grad_scale=None, found_inf=None)``: ``grad_scale`` (a number or
    1-element tensor) divides every gradient inside the kernel; if ``found_inf`` is nonzero
    the step changes nothing (parameters, state and step counts). ``torch.amp.GradScaler``
    passes both through its fused-optimizer protocol (``_step_supports_amp_scaling``), so
    ``scaler.step(opt)`` needs no separate unscale pass. A step checks every parameter,
    gradient and state tensor of every dtype before it moves any; a step that is refused
    creates no state. Parameters or state tensors replaced between steps (``p.data = ...``,
    ``state[p]['exp_avg'].set_(...)``, a new tensor in ``param_groups``) are picked up or
    refused with a clear error, never written through a stale pointer. State the options
    need and a parameter's state lacks (``max_exp_avg_sq`` when amsgrad is switched on, an
    RMSprop ``momentum_buffer`` when momentum is, ``param_ema``) is made when needed, at
    the rule's initial value.

    ``state[p]['step']`` (where torch keeps one) is a 0-dim float32 tensor as in torch and
    is the step count fastadam uses: read before and written after each step inside the C
    call (so an exception around a step never leaves it behind the buffers). Any count
    torch accepts works -- fractional, beyond 2**53, inf; like torch's, a float32 count
    stops growing at 2**24 -- except a negative or NaN one, which is refused.

    Threads and fork: as :class:`fastadam.Adam` (one lock per optimizer; the C passes of
    the process run one at a time; after ``os.fork()`` the child steps on one thread).

    DTensor parameters (``torch.distributed.tensor``, what FSDP2's ``fully_shard`` makes;
    docs/engines.md): each rank updates its local shards, in the same one C call as
    everything else; a shard may be empty or of any size, and the parameter's gradient
    must be a DTensor with its placements (Partial placements are refused). The state
    tensors are DTensors laid out like their parameter (same mesh, placements and local
    shapes; the step counts stay plain 0-dim tensors), so that
    ``torch.distributed.checkpoint`` and its ``get_state_dict``/``set_state_dict`` save,
    reshard and restore them; :func:`full_optim_state_dict` and
    :func:`load_full_optim_state_dict` convert to and from an ordinary state_dict of full
    tensors. A local shard replaced under the same DTensor (``model.to_empty``, a
    ``load_state_dict`` FSDP2 re-pads) is picked up like a replaced ``.data``.
    ``max_grad_norm`` clips by the norm of all shards of the whole model: each rank's sum
    of squares is gathered over the mesh dims its parameters are sharded along and summed
    in rank order (one small collective per step, the same norm on every rank; plain
    tensors next to DTensors are counted once, as replicated), so every rank must step
    together. state_dtype="8bit" works on the local shards: the codes are DTensors laid out
    like the parameter, ``<name>_absmax`` (one per 256 elements of the LOCAL shard) a 1-D
    DTensor, ``Shard(0)`` over the mesh dims the parameter is sharded on, of L + 1 entries
    per rank (L: the largest rank's block count; the last entry a layout stamp, negative);
    DCP resumes it on the same mesh only: a
    reshard, and a full state_dict (:func:`full_optim_state_dict`), are refused
    (ValueError), as no reshard can carry local-shard blocks. Under stochastic rounding
    the random bits are keyed on the element's position in its local shard: other bits
    than one process draws (nearest rounding gives the same bits however the model is
    sharded).
    """

    _step_supports_amp_scaling = True
    _rule: ClassVar[Rule] = None  # type: ignore[assignment]  # each subclass sets its Rule
    _extras: dict[str, Any] = {"ema_decay": None}  # fastadam's group options: only when set
    _fixed: dict[str, Any] = {}  # rule options this class does not expose, at their values
    _setdefaults: dict[str, Any] = {}  # the keys torch's __setstate__ fills in, with its values
    _forced: dict[str, Any] = {}  # group options __setstate__ forces (AdamW's decoupled decay)
    _eager = False  # state made by the constructor (torch's Adagrad)
    _sparse: str | None = None  # the message for a sparse gradient (torch's where it has one)

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        *,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        name = type(self).__name__
        self._lock = _sync.new_lock(self)
        # first: add_param_group (run by torch's constructor) checks parameters against it
        self._fmt = _formats.check_formats(master_weights, state_dtype, rounding, seed)
        if defaults.get("capturable"):
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support capturable=True (CUDA graph "
                f"capture); it updates CPU tensors. Use torch.optim.{name} for that."
            )
        if defaults.get("differentiable"):
            raise NotImplementedError(
                f"fastadam.torch.{name} does not support differentiable=True: the step runs "
                f"in C, outside autograd. Use torch.optim.{name} to differentiate through it."
            )
        for k, d in self._extras.items():
            if k in defaults and _unset(defaults[k], d):
                del defaults[k]
        defaults = self._check_defaults(defaults)
        self.max_grad_norm = check_max_norm(max_grad_norm)
        check_threads(num_threads)
        self.num_threads = num_threads
        self.last_grad_norm = None
        self._cache = None
        self._applied = None
        self._fresh: dict[Any, Any] = {}
        super().__init__(params, defaults)
        _formats.check_master_needed(
            self._fmt, [_NAMES[p.dtype] for g in self.param_groups for p in g["params"]]
        )
        if self._eager:
            self._make_eager_state()

    # ------------------------------------------------------------------ options
    @classmethod
    def _torch_keys(cls):
        """The rule's options that torch's param groups hold."""
        keys = cls.__dict__.get("_torch_keys_")
        if keys is None:
            keys = tuple(
                k for k in cls._rule.defaults if k not in cls._extras and k not in cls._fixed
            )
            cls._torch_keys_ = keys
        return keys

    def _gather(self, group):
        """The rule's options of a group (KeyError for a torch key it lacks)."""
        g = {k: group[k] for k in self._torch_keys()}
        for k, d in self._extras.items():
            g[k] = group.get(k, d)
        g.update(self._fixed)
        return g

    def _torch_checks(self, g):
        """torch.optim's checks of the gathered options, with its exception types and
        messages, so that code written against torch.optim sees the same errors
        (fastadam's stricter checks, e.g. finiteness, come after these)."""
        lr = g["lr"]
        if isinstance(lr, _Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if "betas" in g:
            b = g["betas"]
            try:
                b1, b2 = b
            except (TypeError, ValueError):
                raise TypeError(f"betas must be a pair (beta1, beta2), got {b!r}") from None
            g["betas"] = (b1, b2)
        flags = self._rule.flags
        numbers_ = []
        for name, x in g.items():
            if name == "betas":
                numbers_ += [(f"betas[{i}]", b) for i, b in enumerate(x)]
            elif name not in flags and name != "eps_mode":
                numbers_.append((name, x))
        for label, v in numbers_:
            if isinstance(v, _Tensor) and (v.is_complex() or v.device.type == "meta"):
                raise TypeError(
                    f"{label} must be a real number or a real 1-element tensor, got {_describe(v)}"
                )
        self._rule.torch_check(g)

    def _fastadam_checks(self, g):
        """fastadam's checks of options torch accepted: (the rule's normalised options,
        ema_decay)."""
        rule = self._rule
        plain = {}
        for k, v in g.items():
            if k == "betas":
                plain[k] = tuple(map(_scalar, v))
            elif k in rule.flags or k == "eps_mode":
                plain[k] = v
            else:
                plain[k] = _scalar(v)
        return rule.check(plain), check_ema_decay(plain["ema_decay"])

    def _options_of(self, group):
        """The group's options, checked (torch's messages first): (the rule's normalised
        options, ema_decay)."""
        g = self._gather(group)
        self._torch_checks(g)
        return self._fastadam_checks(g)

    def _check_defaults(self, defaults):
        """The constructor's checks of its options; returns the defaults to install."""
        self._options_of(defaults)
        return defaults

    @classmethod
    def _key_spec(cls):
        spec = cls.__dict__.get("_key_spec_")
        if spec is None:
            keys = cls._torch_keys()
            spec = (
                operator.itemgetter(*keys),
                keys.index("betas") if "betas" in keys else -1,
                tuple(cls._extras.items()),
            )
            cls._key_spec_ = spec
        return spec

    def _keys(self, groups):
        """Each group's options as plain values (tensors read), to notice a change
        cheaply."""
        get, betas, extras = self._key_spec()
        out = []
        try:
            for g in groups:
                values = list(map(_key, get(g)))
                if betas >= 0:  # its tensors read too (an in-place change is a change)
                    values[betas] = tuple(map(_key, g["betas"]))
                values += [_key(g.get(k, d)) for k, d in extras]
                out.append(tuple(values))
        except KeyError as e:
            raise ValueError(f"a param group lacks the option {e.args[0]!r}") from None
        return out

    def _needs_of(self, options):
        rule = self._rule
        return tuple((tuple(rule.needs(o)), ema is not None) for o, ema in options)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
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
                    p = p[1] if isinstance(p, tuple) else p
                    _check_param(p, f"param group {gi}, parameter {i}")
                    self._layout(p, f"param group {gi}, parameter {i}")
            super().add_param_group(param_group)
            group = self.param_groups[-1]
            try:
                if group.get("capturable") or group.get("differentiable"):
                    raise NotImplementedError(
                        "fastadam.torch: capturable and differentiable must be False"
                    )
                self._options_of(group)
            except BaseException:
                self.param_groups.pop()
                raise
            self._cache = None

    def _make_eager_state(self):
        """The state torch's constructor makes (Adagrad: ``step`` 0 and ``sum`` at
        initial_accumulator_value for every parameter)."""
        for group in self.param_groups:
            o = self._options_of(group)[0]
            for p in group["params"]:
                self.state[p] = self._new_state(p, o, None, self._layout(p))

    def __getstate__(self):
        state = super().__getstate__()
        state["_fastadam"] = {
            "max_grad_norm": self.max_grad_norm,
            "num_threads": self.num_threads,
            "_fmt": self._fmt,
        }
        return state

    def __setstate__(self, state):
        if "_lock" not in self.__dict__:  # unpickling: __init__ did not run
            self._lock = _sync.new_lock(self)
        with self._lock:
            if (
                isinstance(state, dict)
                and "param_groups" in self.__dict__
                and "state" in state
                and "param_groups" in state
            ):
                # load_state_dict: check everything before anything is replaced
                loading = self.__dict__.get("_loading")
                if loading and "state_dict" in loading:
                    self._uncast(state["state"], state["param_groups"], loading["state_dict"])
                self._check_loaded(state["state"], state["param_groups"])
            extra = state.pop("_fastadam", None) if isinstance(state, dict) else None
            super().__setstate__(state)
            if extra is not None:
                self.__dict__.update(extra)
            for name, default in (
                ("max_grad_norm", None),
                ("num_threads", None),
                ("last_grad_norm", None),
                ("_fmt", _DEFAULT_FORMATS),
            ):
                self.__dict__.setdefault(name, default)
            rule = self._rule
            for group in self.param_groups:
                self._complete(group)
                for p in group["params"]:
                    s = self.state.get(p)
                    if not s or not isinstance(s, dict):
                        continue
                    # as torch's __setstate__: numbers become its 0-dim tensors
                    for k in ("step",) + ((rule.scalar[0],) if rule.scalar else ()):
                        if k in s and not isinstance(s[k], _Tensor):
                            s[k] = _torch.tensor(float(s[k]), dtype=_step_dtype())
                    # param_ema_step as an exact count (torch's load casts it to the
                    # parameter's dtype)
                    v = s.get("param_ema_step")
                    if v is not None and not (isinstance(v, _Tensor) and v.dtype == _torch.int64):
                        s["param_ema_step"] = _torch.tensor(
                            _count_value(v, "param_ema_step", "a parameter"), dtype=_torch.int64
                        )
            self._cache = None  # state or groups were replaced: rebuild the plans
            self._applied = None
            self._fresh = {}

    def _complete(self, group):
        """Fill in the keys torch's __setstate__ fills in, and the extras the constructor
        set (a checkpoint of torch.optim has no ema_decay: the constructor's applies)."""
        for k, v in self._setdefaults.items():
            group.setdefault(k, v)
        for k in self._extras:
            if k in self.defaults:
                group.setdefault(k, self.defaults[k])
        group.update(self._forced)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but everything is checked before anything is replaced: the layout,
        every group's options, and every parameter's state (only the rule's keys, the
        parameter's shape, a step count >= 0); an error names the parameter by group and
        index, and leaves this optimizer unchanged."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing the keys {missing}")
        unknown = [k for k in state_dict if k not in ("state", "param_groups", "formats")]
        if unknown:
            raise ValueError(f"state_dict has unknown keys {sorted(map(repr, unknown))}")
        saved = state_dict.get("formats")
        if saved is None:
            # torch.distributed.checkpoint's state_dict API (get_state_dict/set_state_dict)
            # keeps only 'state' and 'param_groups': a state of DTensors without 'formats'
            # is taken to be in this optimizer's (every tensor's dtype, shape and layout is
            # still checked against them below)
            saved = (
                self.formats if _holds_dtensor(state_dict["state"]) else _DEFAULT_FORMATS.as_dict()
            )
        if not isinstance(saved, dict):
            raise TypeError(f"state_dict['formats'] must be a dict, got {type(saved).__name__}")
        if saved != self.formats:
            raise ValueError(
                f"state_dict['formats'] is {saved}, this optimizer's are "
                f"{self.formats}: a state_dict loads only into an optimizer with "
                f"the same master_weights, state_dtype, rounding and seed"
            )
        if not isinstance(state_dict["state"], dict):
            raise TypeError("state_dict['state'] must be a dict")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups
        ):
            raise TypeError(
                "state_dict['param_groups'] must be a list of dicts, each with a 'params' list"
            )
        for key, entry in state_dict["state"].items():
            if not isinstance(entry, dict):
                raise TypeError(
                    f"state_dict['state'][{key!r}] must be a dict, got {type(entry).__name__}"
                )
            for k, t in entry.items():
                # torch's load_state_dict copies tensors to the parameter's device first
                if isinstance(t, _Tensor) and (t.device.type != "cpu" or t.layout is not _STRIDED):
                    raise ValueError(
                        f"state_dict['state'][{key!r}][{k!r}] is {_describe(t)} "
                        f"({t.layout}); fastadam.torch's state is dense CPU tensors"
                    )
        with self._lock:
            # torch casts every state tensor but 'step' to its parameter's dtype: a hook
            # run last hands the dict it loads to __setstate__, which keeps the saved
            # tensors where the format stores another dtype (master weights, bfloat16 or
            # 8-bit moments)
            loading: dict[str, Any] = {}
            hook = self.register_load_state_dict_pre_hook(
                lambda _, sd: loading.__setitem__("state_dict", sd)
            )
            self._loading: dict[str, Any] | None = loading
            try:
                super().load_state_dict(state_dict)
            finally:
                hook.remove()
                self._loading = None

    @property
    def _counted(self):
        """The state keeps a ``step``: torch's rules with one, and under stochastic
        rounding every rule (the random bits are keyed on the step: SGD's and Lion's
        count is then saved with their state, so a resumed run draws the same bits)."""
        return self._rule.step or self._fmt.stochastic

    def _required(self):
        """The state keys every non-empty state of this rule has (torch makes them
        together); the others are made when the options need them."""
        cls = type(self)
        keys = cls.__dict__.get("_required_")
        if keys is None:
            rule = cls._rule
            core = rule.needs(rule.check(dict(rule.defaults)))
            keys = ((rule.scalar[0],) if rule.scalar else ()) + tuple(core)
            cls._required_ = keys
        return (("step",) if self._counted else ()) + keys

    def _known(self):
        """Every key a state of this rule may hold."""
        cls = type(self)
        keys = cls.__dict__.get("_known_")
        if keys is None:
            rule = cls._rule
            keys = (
                ((rule.scalar[0],) if rule.scalar else ())
                + ("master_param",)
                + tuple(rule.state)
                + tuple(k + "_absmax" for k in rule.state)
                + ("param_ema", "param_ema_step")
            )
            cls._known_ = keys
        return (("step",) if self._counted else ()) + keys

    # ------------------------------------------------------------------ formats
    @property
    def formats(self) -> dict[str, Any]:
        """The storage options (docs/formats.md) as ``state_dict()["formats"]`` holds them:
        master_weights, state_dtype (None, "float32", "float64", "bfloat16", "8bit"),
        rounding and seed."""
        return self._fmt.as_dict()

    def _layout(self, p, where="a parameter"):
        """How p is stored and updated (a _formats.ParamFormat: its format, one per state
        stream, master weights?); TypeError naming `where` if the formats do not fit p."""
        pf = _formats.param_format(self._rule, _NAMES[p.dtype], p.numel(), self._fmt, where)
        if _is_dtensor(p) and any(map(_formats.is_q8, pf.states)):
            # numel above is the GLOBAL one: every rank decides the same. The absmax layout
            # (_q8_layout) follows torch.chunk's split, which is what Shard means; other
            # placements (_StridedShard, say) split otherwise
            from torch.distributed.tensor import Replicate, Shard

            odd = [pl for pl in p.placements if type(pl) not in (Shard, Replicate)]
            if odd:
                raise TypeError(
                    f"{where} is {_describe(p)}: state_dtype='8bit' supports "
                    f"DTensor parameters placed by Shard and Replicate only, "
                    f"not {odd[0]}; use state_dtype='bfloat16' or None"
                )
        if p.is_complex() and not pf.native:
            raise TypeError(
                f"{where} is {_describe(p)}: complex parameters keep their "
                f"state in their own dtype (state_dtype must be None or "
                f"float32, got {self._fmt.state_dtype!r})"
            )
        return pf

    @staticmethod
    def _stream_dtype(p, fmt):
        """The dtype of a state stream of p stored in format `fmt` (param_ema: native)."""
        if fmt == _core.FMT_NATIVE:
            return _torch.float32 if p.dtype in _HALF else p.dtype
        return _FMT_DTYPES[_formats.fmt_dtype(fmt, "float32")]

    def state_dict(self) -> dict[str, Any]:
        """As torch's, plus ``"formats"`` unless they are the defaults: the storage options
        (see :attr:`formats`), which load_state_dict requires to be this optimizer's (a
        state_dict without them, torch.optim's say, holds default formats). Every
        format's state is there as it is held: ``master_param`` (float32), moments in
        their dtype (8-bit: uint8 codes and ``<name>_absmax``).

        State of a tensor that is in no param group is left out (torch.optim raises
        KeyError): it can never be stepped again. This happens when an engine replaces
        the groups' tensors after the constructor made state for them, as DeepSpeed ZeRO
        does to Adagrad (docs/engines.md)."""
        live = {id(p) for g in self.param_groups for p in g["params"]}
        state = self.state
        if any(id(p) not in live for p in state):
            self.state = type(state)(
                state.default_factory, {p: s for p, s in state.items() if id(p) in live}
            )
        try:
            sd = super().state_dict()
        finally:
            self.state = state
        if self._fmt != _DEFAULT_FORMATS:  # else exactly torch's layout
            sd["formats"] = self.formats
        return sd

    def _uncast(self, state, groups, saved):
        """Put back the saved tensors that torch's load_state_dict cast to their
        parameter's dtype where this optimizer's format keeps another dtype: every
        tensor but 'step' of a 16-bit parameter (its master, float32 moments,
        mu_product, ...), and 16-bit or 8-bit moments (with their absmax) of a float32
        parameter. `state` is the new state torch is about to install, keyed by
        parameter; `saved` the state_dict it was made from."""
        try:
            ids = [i for g in saved["param_groups"] for i in g["params"]]
            params = [p for g in groups for p in g["params"]]
            raw = saved["state"]
        except (KeyError, TypeError):
            return  # malformed: _check_loaded says why
        for i, p in zip(ids, params):
            entry, s = raw.get(i), state.get(p)
            if not (
                isinstance(entry, dict)
                and isinstance(s, dict)
                and isinstance(p, _Tensor)
                and p.dtype in _NAMES
            ):
                continue
            half = p.dtype in _HALF
            fmts = {} if half else dict(zip(self._rule.state, self._layout(p).states))
            for k, v in entry.items():
                if k == "step" or k not in s or not isinstance(v, _Tensor):
                    continue
                fmt = fmts.get(k, _core.FMT_NATIVE)
                if half or (fmt != _core.FMT_NATIVE and v.dtype == self._stream_dtype(p, fmt)):
                    s[k] = v.to(device=p.device)

    def _check_extras(self, p, s, pf, where):
        """Raise unless the master weights and every 8-bit stream's absmax in state s fit
        p's formats pf (the streams themselves are checked by the caller)."""
        if pf.master:
            if "master_param" not in s:
                raise ValueError(
                    f"the state of {where} lacks ['master_param'] (master_weights=True)"
                )
            self._fit(s["master_param"], p, "master_param", _torch.float32, where)
        elif "master_param" in s:
            raise ValueError(
                f"the state of {where} has 'master_param', but this optimizer "
                f"keeps no master weights for {_describe(p)}"
            )
        for k, fmt in zip(self._rule.state, pf.states):
            a = s.get(k + "_absmax")
            if _formats.is_q8(fmt) and s.get(k) is not None:
                if a is None:
                    raise ValueError(f"the state of {where} lacks ['{k}_absmax'] (8-bit state)")
                self._fit_absmax(a, p, k + "_absmax", where)
            elif a is not None:
                raise ValueError(
                    f"the state of {where} has '{k}_absmax', but its {k!r} is not 8-bit here"
                )

    def _check_loaded(self, state, groups):
        """Raise unless (state, groups), as torch's load_state_dict is about to install
        them, can be stepped."""
        rule = self._rule
        if not isinstance(state, dict):
            raise TypeError("state_dict['state'] must be a dict")
        optional = set(self._setdefaults) | set(self._extras) | set(self._forced)
        params = {}
        for gi, g in enumerate(groups):
            missing = [k for k in self._torch_keys() if k not in g and k not in optional]
            if missing:
                raise ValueError(f"state_dict['param_groups'][{gi}] lacks {missing}")
            g = dict(g)
            self._complete(g)
            self._options_of(g)
            for i, p in enumerate(g["params"]):
                params[id(p)] = (p, f"param group {gi}, parameter {i}")
        known, required = self._known(), self._required()
        streams = tuple(rule.state) + ("param_ema",)
        for p, s in state.items():
            if id(p) not in params:
                raise ValueError("state_dict['state'] has an entry for an unknown parameter")
            p, where = params[id(p)]
            if not isinstance(s, dict):
                raise TypeError(f"the state of {where} must be a dict, got {type(s).__name__}")
            unknown = [k for k in s if k not in known]
            if unknown:
                raise ValueError(
                    f"the state of {where} has unknown keys "
                    f"{sorted(map(repr, unknown))} (not a state of "
                    f"{rule.title}?)"
                )
            if not s:
                continue
            missing = [k for k in required if k not in s]
            if missing:
                raise ValueError(f"the state of {where} lacks {missing}")
            if self._counted:
                _step_value(s["step"], where)
            if rule.scalar:
                _unit_value(s[rule.scalar[0]], rule.scalar[0], where)
            if s.get("param_ema_step") is not None:
                _count_value(s["param_ema_step"], "param_ema_step", where)
            pf = self._layout(p, where)
            fmts = dict(zip(rule.state, pf.states), param_ema=_core.FMT_NATIVE)
            if _is_dtensor(p):  # 8-bit state of another mesh: say so before the codes' shape
                for k, fmt in zip(rule.state, pf.states):
                    if _formats.is_q8(fmt) and s.get(k + "_absmax") is not None:
                        self._fit_absmax(s[k + "_absmax"], p, k + "_absmax", where)
            for k in streams:
                t = s.get(k)
                if t is None and k not in required:
                    continue  # made when the options need it
                self._fit(t, p, k, self._stream_dtype(p, fmts[k]), where)
            self._check_extras(p, s, pf, where)

    # -------------------------------------------------------------------- state
    def _initial(self, key, o):
        """The value a new state stream starts at, for a group with options o."""
        return self._rule.initial(key, o) if key != "param_ema" else 0.0

    def _make(self, p, key, o, fmt=_core.FMT_NATIVE):
        """A new state stream of p at the rule's initial value (torch's zeros_like /
        full_like) in format `fmt`: {key: tensor}, and for 8-bit also {key + "_absmax":
        its blocks' absmax}."""
        init = self._initial(key, o)
        dtype = self._stream_dtype(p, fmt)
        if dtype == p.dtype:
            if init == 0.0:
                return {key: _torch.zeros_like(p, memory_format=_torch.preserve_format)}
            return {
                key: _torch.full_like(
                    p,
                    complex(init, init) if p.is_complex() else init,
                    memory_format=_torch.preserve_format,
                )
            }
        if _formats.is_q8(fmt):
            local = _local(p)
            codes, absmax = _quantize(
                np.full(local.numel(), init, np.float32), fmt == _core.FMT_Q8_SIGNED
            )
            codes = _torch.from_numpy(codes).reshape(local.shape)
            absmax = _torch.from_numpy(absmax)
            if not _is_dtensor(p):
                return {key: codes, key + "_absmax": absmax}
            # codes laid out like p; the absmax as _q8_layout says (unused entries 0)
            from torch.distributed.tensor import DTensor

            L, length, placements, stamp = _q8_layout(p)
            padded = _torch.zeros(L + 1, dtype=_torch.float32)
            padded[: absmax.numel()] = absmax
            padded[L] = stamp
            return {
                key: DTensor.from_local(
                    codes,
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                ),
                key + "_absmax": DTensor.from_local(
                    padded, p.device_mesh, placements, run_check=False, shape=(length,), stride=(1,)
                ),
            }
        # float32, or the float32 value rounded to nearest once (bfloat16, float16)
        if _is_dtensor(p):  # a DTensor laid out like p
            return {key: _torch.full_like(p, init, dtype=_torch.float32).to(dtype)}
        return {key: _torch.full(p.shape, init, dtype=_torch.float32).to(dtype)}

    def _new_state(self, p, o, ema, pf):
        """A parameter's first state, in torch's key order (fastadam's keys among them:
        ``master_param`` after the counts, ``<name>_absmax`` after each 8-bit stream)."""
        rule = self._rule
        s = {}
        if self._counted:
            s["step"] = _torch.tensor(0.0, dtype=_step_dtype())
        if rule.scalar:
            s[rule.scalar[0]] = _torch.tensor(rule.scalar[1], dtype=_step_dtype())
        if pf.master:  # the parameter widened (exactly), refreshed until its first step
            s["master_param"] = p.detach().to(_torch.float32, copy=True)
        fmts = dict(zip(rule.state, pf.states))
        for k in rule.needs(o):
            s.update(self._make(p, k, o, fmts[k]))
        if ema is not None:
            s.update(self._make(p, "param_ema", o))
            s["param_ema_step"] = _torch.tensor(0, dtype=_torch.int64)
        return s

    def _fit(self, t, p, key, dtype, where, shape=None):
        """Raise unless t can be the state tensor `key` of p; returns t, or a contiguous
        copy of it (kept as the state from then on)."""
        if not isinstance(t, _Tensor):
            raise TypeError(f"state[{key!r}] of {where} must be a tensor, got {type(t).__name__}")
        shape = p.shape if shape is None else shape
        if t.shape != shape or t.dtype != dtype or t.device != p.device or t.layout is not _STRIDED:
            raise ValueError(
                f"state[{key!r}] of {where} is {_describe(t)} ({t.layout}); it "
                f"must be a dense {str(dtype).replace('torch.', '')} tensor of "
                f"shape {tuple(shape)} on {p.device} (the parameter is "
                f"{_describe(p)})"
            )
        dt = _is_dtensor(p)
        if dt != _is_dtensor(t) or (
            dt
            and (
                t.placements != p.placements
                or t.device_mesh != p.device_mesh
                or t._local_tensor.shape != p._local_tensor.shape
            )
        ):
            raise ValueError(
                f"state[{key!r}] of {where} is {_describe(t)}; the parameter is "
                f"{_describe(p)}: "
                + (
                    "the state of a DTensor parameter is a DTensor laid out like it (same "
                    "mesh, placements and local shape; load a full state_dict with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict or "
                    "fastadam.torch.load_full_optim_state_dict)"
                    if dt
                    else "the state of a plain tensor is a plain tensor"
                )
            )
        return t if _local(t).is_contiguous() else t.contiguous()

    def _fit_absmax(self, a, p, key, where):
        """_fit for the absmax `key` of p's 8-bit stream: ceil(n / 256) float32 entries; of a
        DTensor parameter, the 1-D DTensor _q8_layout describes. Anything else on a DTensor
        parameter is 8-bit state of another mesh (or none): refused, as no reshard can
        carry it (the blocks are the local shards')."""
        if not _is_dtensor(p):
            return self._fit(a, p, key, _torch.float32, where, (_blocks(p.numel()),))
        L, length, placements, stamp = _q8_layout(p)
        if not (
            _is_dtensor(a)
            and a.dtype == _torch.float32
            and a.device == p.device
            and a.layout is _STRIDED
            and tuple(a.shape) == (length,)
            and a.device_mesh == p.device_mesh
            and tuple(a.placements) == placements
            and tuple(a._local_tensor.shape) == (L + 1,)
        ):
            raise ValueError(
                f"state[{key!r}] of {where} is {_describe(a)}; the parameter is "
                f"{_describe(p)}, whose 8-bit state needs a float32 DTensor of global shape "
                f"({length},) ({', '.join(map(str, placements))}: {L + 1} per rank) on this mesh: "
                f"8-bit state cannot be resharded (its absmax is one per 256 elements of "
                f"each rank's local shard); load an 8-bit checkpoint on the mesh that saved "
                f"it (docs/engines.md, FSDP2)"
            )
        saved = float(a._local_tensor[L])
        if saved != stamp:
            raise ValueError(
                f"state[{key!r}] of {where} was saved for another layout (its layout stamp "
                f"{saved!r} is not {stamp!r}, this mesh's): 8-bit state cannot be resharded "
                f"(its absmax is one per 256 elements of each rank's local shard); load an "
                f"8-bit checkpoint on the mesh that saved it (docs/engines.md, FSDP2)"
            )
        return a if a._local_tensor.is_contiguous() else a.contiguous()

    def _state_updates(self, p, s, o, needs, pf, where):
        """What s needs to be usable by the plan (a dict of replacements, applied only once
        the whole step has been checked): streams the options need and s lacks (amsgrad
        switched on, say), 0-dim tensors for the step and scalar mirrors, contiguous
        state tensors. Raises if s cannot be used."""
        rule = self._rule
        required = self._required()
        missing = [k for k in required + (("master_param",) if pf.master else ()) if k not in s]
        if missing:
            raise ValueError(f"state of {where} lacks {missing}")
        updates = {}
        if self._counted:
            step = s["step"]
            value = _step_value(step, where)
            if not _is_mirror(step, (_torch.float32, _torch.float64)):
                # a Python number, an integer or 1-element tensor: torch's own float tensor
                updates["step"] = _torch.tensor(value, dtype=_step_dtype())
        if rule.scalar:
            k = rule.scalar[0]
            value = _unit_value(s[k], k, where)
            if not _is_mirror(s[k], (_torch.float32, _torch.float64)):
                updates[k] = _torch.tensor(value, dtype=_step_dtype())
        if pf.master:
            t = s["master_param"]
            u = self._fit(t, p, "master_param", _torch.float32, where)
            if u is not t:
                updates["master_param"] = u
        for k, fmt in zip(tuple(rule.state) + ("param_ema",), pf.states + (_core.FMT_NATIVE,)):
            t = s.get(k)
            if t is None and k not in required:
                if k in needs:  # switched on after the state was made: start it
                    updates.update(self._make(p, k, o, fmt))
                    if k == "param_ema":
                        updates["param_ema_step"] = _torch.tensor(0, dtype=_torch.int64)
                    elif not rule.step and "step" in s:
                        # SGD's counted state: a new buffer's first step is torch's
                        # buf = g, selected by the count (restarted)
                        updates["step"] = _torch.tensor(0.0, dtype=_step_dtype())
                continue
            u = self._fit(t, p, k, self._stream_dtype(p, fmt), where)
            if u is not t:
                updates[k] = u  # a (rare) copy, kept as the state from now on
            if _formats.is_q8(fmt):
                key = k + "_absmax"
                a = s.get(key)
                if a is None:
                    raise ValueError(f"state of {where} lacks ['{key}'] (8-bit state)")
                u = self._fit_absmax(a, p, key, where)
                if u is not a:
                    updates[key] = u
        if s.get("param_ema") is not None:
            v = s.get("param_ema_step")
            if v is None:
                updates["param_ema_step"] = _torch.tensor(0, dtype=_torch.int64)
            else:
                value = _count_value(v, "param_ema_step", where)
                if not _is_mirror(v, _COUNT_DTYPES):
                    updates["param_ema_step"] = _torch.tensor(value, dtype=_torch.int64)
        return updates

    def _rebuild(self, init, options=None):
        """(Re)build the plans from the parameters and their state tensors. All or
        nothing: the state is changed (created, completed) only once every parameter and
        plan has been checked.

        init: also create the state of parameters that have a grad and no state yet
        (torch's lazy initialisation at their first step). options: every group's
        checked options, if the caller has them."""
        rule = self._rule
        if options is None:
            options = [self._options_of(g) for g in self.param_groups]
        # SGD's and Lion's buffers fastadam made that no step has written yet: SGD's first
        # step copies g into its buffer (torch's buf = g), selected by a count of 0
        fresh = {}
        for key, (t, plan, bi) in self._fresh.items():
            if plan is None or plan.get_steps()[bi] == 0:
                fresh[key] = t
        known = self._known()
        c = _Cache()
        per_dtype = {}  # plan dtype -> _Lists
        pending = []  # (p, new state dict or None, updates)
        state_tensors = []
        index = -1  # the parameter's position over all groups (stochastic rounding's key)
        counted = self._counted
        for gi, group in enumerate(self.param_groups):
            o, ema = options[gi]
            needs = tuple(rule.needs(o)) + (("param_ema",) if ema is not None else ())
            stateless = not needs and not counted and not rule.scalar
            for i, p in enumerate(group["params"]):
                index += 1
                where = f"param group {gi}, parameter {i}"
                _check_param(p, where)
                pf = self._layout(p, where)
                c.ids.append(id(p))
                c.tensors.append(p)
                c.shapes.append(_local(p).shape)
                s = self.state.get(p)
                if s is not None and not isinstance(s, dict):
                    raise TypeError(f"the state of {where} must be a dict, got {type(s).__name__}")
                made = ()
                if not s:
                    if stateless:
                        s = {}  # SGD without momentum: no state, as torch
                    elif not init or p.grad is None:
                        c.slots.append(None)
                        continue
                    else:
                        s = self._new_state(p, o, ema, pf)
                        pending.append((p, s, None))
                        made = tuple(s)
                else:
                    updates = self._state_updates(p, s, o, needs, pf, where)
                    if updates:
                        pending.append((p, None, updates))
                        made = tuple(k for k in updates if s.get(k) is None)
                        s = dict(s, **updates)
                key, cplx = _SUPPORTED[p.dtype]
                lists = per_dtype.get(key)
                if lists is None:
                    lists = per_dtype[key] = _Lists()
                lists.params.append(_view(p))
                lists.states.append(
                    tuple(None if s.get(k) is None else _view(s[k]) for k in rule.state)
                )
                half = p.dtype if p.dtype in _HALF else None
                # a stream the state lacks is given as native (a new one means a new plan)
                lists.formats.append(
                    (pf.param,)
                    + tuple(
                        _core.FMT_NATIVE if s.get(k) is None else f
                        for k, f in zip(rule.state, pf.states)
                    )
                )
                lists.masters.append(_view(s["master_param"]) if pf.master else None)
                lists.absmaxes.append(
                    tuple(
                        _absmax_view(s[k + "_absmax"], p)
                        if _formats.is_q8(f) and s.get(k) is not None
                        else None
                        for k, f in zip(rule.state, pf.states)
                    )
                )
                lists.indices.append(index)
                lists.plain = lists.plain and pf.native
                ema_t = s.get("param_ema")
                lists.emas.append(None if ema_t is None else _view(ema_t))
                lists.ema_steps.append(None if ema_t is None else s["param_ema_step"].numpy())
                lists.groups.append(gi)
                lists.labels.append(where)
                if counted:
                    lists.steps.append(s["step"].numpy())
                if rule.scalar:
                    lists.scalars.append(s[rule.scalar[0]].numpy())
                if pf.master and counted and float(s["step"]) == 0.0:
                    c.unsynced.append((p, s["master_param"], s["step"]))
                if not counted:
                    new = [
                        s[k]
                        for k in needs
                        if k != "param_ema"
                        and s.get(k) is not None
                        and (k in made or fresh.get(id(s[k])) is s[k])
                    ]
                    lists.counts.append(0 if new else 1)
                    lists.fresh.append(new)
                lists.slots.append(
                    (len(c.slots), cplx, half, p.placements if _is_dtensor(p) else None)
                )
                state_tensors += [s[k] for k in known if isinstance(s.get(k), _Tensor)]
                c.slots.append(None)
        ngroups = max(len(self.param_groups), 1)
        new_fresh = {}
        for lists in per_dtype.values():
            fmt = (
                {}
                if lists.plain
                else dict(
                    formats=lists.formats,
                    masters=lists.masters,
                    absmaxes=lists.absmaxes,
                    indices=lists.indices,
                    stochastic=self._fmt.stochastic,
                    seed=self._fmt.seed,
                )
            )
            plan = _core._Plan(
                rule.index,
                tuple(rule.state),
                lists.params,
                lists.states,
                lists.emas,
                lists.groups,
                ngroups,
                labels=lists.labels,
                step_mirrors=lists.steps if counted else None,
                scalar_mirrors=lists.scalars if rule.scalar else None,
                ema_mirrors=lists.ema_steps,
                **fmt,
            )
            if not counted:
                for bi, (count, new) in enumerate(zip(lists.counts, lists.fresh)):
                    plan.set_step(bi, count)
                    for t in new:
                        new_fresh[id(t)] = (t, plan, bi)
            pi = len(c.plans)
            for bi, (pos, cplx, half, placed) in enumerate(lists.slots):
                c.slots[pos] = (pi, bi, cplx, half, placed)
            c.plans.append(plan)
        # Everything is checked: install the new and completed state (undone by _undo
        # if the step that asked for it is refused).
        undo = []
        for p, new, updates in pending:
            if new is not None:
                self.state[p] = new
                undo.append((p, None))
            else:
                undo.append((p, {k: self.state[p].get(k, _MISSING) for k in updates}))
                self.state[p].update(updates)
        self._fresh = new_fresh
        c.tensors += state_tensors
        c.dtensors = any(map(_is_dtensor, c.tensors))
        c.ptrs = _ptrs(c.tensors, c.dtensors)
        c.storages = [_local(t).untyped_storage() for t in c.tensors]
        if c.dtensors:
            c.reduce = self._reductions(c)
        c.needs = self._needs_of(options)
        c.state = self.state
        c.state_ids, c.inner_ids = _state_ids(self.state)
        self._cache = c
        self._applied = None
        return undo

    def _undo(self, undo):
        """Take back the state a rebuild installed (a refused step creates none)."""
        for p, old in reversed(undo):
            if old is None:
                self.state.pop(p, None)
            else:
                for k, v in old.items():
                    if v is _MISSING:
                        self.state[p].pop(k, None)
                    else:
                        self.state[p][k] = v
        self._cache = None

    def _where(self, p):
        """'param group i, parameter j' of parameter p (for errors)."""
        for gi, group in enumerate(self.param_groups):
            for i, q in enumerate(group["params"]):
                if q is p:
                    return f"param group {gi}, parameter {i}"
        return "a parameter"

    def _collect(self):
        """(per-plan gradient lists of NumPy views or None, any active) from the .grad
        tensors, or None if the plans must be rebuilt first (a parameter's first
        gradient, a parameter, its data or a state entry replaced, ...)."""
        c = self._cache
        flat = [p for g in self.param_groups for p in g["params"]]
        state = self.state
        if (
            list(map(id, flat)) != c.ids
            or state is not c.state
            or _ptrs(c.tensors, c.dtensors) != c.ptrs
            or _state_ids(state) != (c.state_ids, c.inner_ids)
        ):
            return None
        grads = [[None] * len(plan) for plan in c.plans]
        active = False
        for slot, p in zip(c.slots, flat):
            g = p.grad
            if g is None:
                continue
            if slot is None:
                return None  # first gradient of this parameter: create its state
            if slot[4] is not None or (c.dtensors and _is_dtensor(g)):
                g = self._local_grad(p, g, slot[4])
            if g.layout is not _STRIDED:
                name = type(self).__name__
                raise _SparseGradientError(
                    self._sparse
                    or (
                        f"fastadam.torch.{name} does not support sparse gradients "
                        f"(torch.optim.{name} does: use it for sparse gradients)"
                    )
                )
            if g.is_conj():
                g = g.resolve_conj()  # read only: a copy of a lazily conjugated view
            if g.is_neg():
                g = g.resolve_neg()
            if not g.is_contiguous():
                g = g.contiguous()  # read only; a copy only for odd layouts
            if slot[2]:
                if not g.is_complex():
                    raise TypeError(
                        f"the gradient of a complex parameter must be complex, got {_describe(g)}"
                    )
                g = _torch.view_as_real(g)
            elif slot[3] is not None:  # a 16-bit parameter: its gradient has its dtype
                if p.dtype is not slot[3]:
                    return None  # p.data reinterpreted in place (same memory, new dtype)
                if g.dtype is not p.dtype:
                    raise TypeError(
                        f"the gradient of {self._where(p)} is {_describe(g)}; the "
                        f"gradient of a {str(p.dtype)[6:]} parameter must be "
                        f"{str(p.dtype)[6:]} (torch's rule)"
                    )
                g = g.view(_torch.int16)
            try:
                grads[slot[0]][slot[1]] = g.numpy()
            except RuntimeError:  # a gradient that requires grad (create_graph=True)
                grads[slot[0]][slot[1]] = g.detach().numpy()
            except TypeError:  # a dtype NumPy lacks (bfloat16) on a float32 parameter
                raise TypeError(
                    f"the gradient of {self._where(p)} is {_describe(g)}; it "
                    f"must have the parameter's dtype, {str(p.dtype)[6:]}"
                ) from None
            active = True
        return grads, active

    def _apply(self, keys):
        rule = self._rule
        options = [self._options_of(g) for g in self.param_groups]
        for plan in self._cache.plans:
            for gi, (o, ema) in enumerate(options):
                plan.set_options(
                    gi, o["lr"], o["weight_decay"], o["maximize"], ema, rule.c_hyper(o)
                )
        self._applied = keys

    # --------------------------------------------------------------------- step
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scale: _Tensor | float | None = None,
        found_inf: _Tensor | None = None,
    ) -> Any:
        """One step for every parameter whose ``.grad`` is not None.

        Args:
            closure: re-evaluates the model and returns the loss (run with grad enabled).
            grad_scale: a number or 1-element tensor every gradient is divided by, inside
                the kernel (loss scaling); default: the ``grad_scale`` attribute that
                ``torch.amp.GradScaler.step`` sets, else 1.
            found_inf: a number or 1-element tensor; if nonzero nothing changes
                (parameters, state, step counts); default: the ``found_inf`` attribute
                GradScaler sets.

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

        keys = self._keys(self.param_groups)
        options = None
        if changed(keys, self._applied):
            # before any state is made
            options = [self._options_of(g) for g in self.param_groups]
        undo = []
        marks = None  # the plans' step counts before the C pass: did it run?
        norm = None  # the global gradient norm of a step over DTensors, once computed
        try:
            c = self._cache
            if c is None or (options is not None and c.needs != self._needs_of(options)):
                undo += self._rebuild(init=True, options=options)
            for attempt in range(2):
                collected = self._collect()
                if collected is None:
                    undo += self._rebuild(init=True, options=options)
                    collected = self._collect()
                    if collected is None:  # pragma: no cover - the rebuild covers every trigger
                        raise RuntimeError("fastadam.torch: could not build the optimizer plan")
                all_grads, active = collected
                if changed(keys, self._applied):
                    self._apply(keys)
                c = self._cache
                if not active:
                    return
                if c.unsynced:
                    self._sync_masters(c)
                marks = [(plan, plan.step_count) for plan in c.plans]
                try:
                    if max_norm and c.dtensors:
                        # the norm of the whole model, not of this rank's shards: computed
                        # once per step (every rank must take part in the same collectives,
                        # also when this rank retries below) and folded into the scale
                        if norm is None:
                            norm = self._global_norm(c, all_grads, threads, scale)
                        _core.step_plans(
                            c.plans,
                            all_grads,
                            threads,
                            _clipped_scale(norm, max_norm, scale),
                            False,
                            0.0,
                        )
                        self.last_grad_norm = norm
                        return
                    _, self.last_grad_norm = _core.step_plans(
                        c.plans, all_grads, threads, scale, False, max_norm
                    )
                    return
                except ValueError:
                    # p.data replaced by a tensor of another shape at the same address: the
                    # gradients no longer fit the plans. Rebuild once and check again.
                    if attempt or [_local(t).shape for t in c.tensors[: len(c.ids)]] == c.shapes:
                        raise
                    self._cache = None
                    undo += self._rebuild(init=True, options=options)
        except BaseException:
            # Unless the C pass ran (an exception raised just after it, a
            # KeyboardInterrupt say: then the state is what the buffers were updated
            # with, and stays), take back the state this step made.
            ran = marks is not None and any(plan.step_count != n for plan, n in marks)
            if undo and not ran:
                self._undo(undo)
            raise

    # ----------------------------------------------------------------- DTensor
    def _local_grad(self, p, g, placed):
        """The local shard of the gradient g of p (placed: p's placements, or None for a
        plain tensor): a DTensor parameter's gradient is a DTensor laid out like it."""
        if placed is None:
            raise TypeError(
                f"the gradient of {self._where(p)} is {_describe(g)}; the "
                f"gradient of a plain tensor must be a plain tensor"
            )
        if not _is_dtensor(g) or g.placements != placed:
            raise TypeError(
                f"the gradient of {self._where(p)} is {_describe(g)}; the "
                f"gradient of {_describe(p)} must be a DTensor with its "
                f"placements"
            )
        return g._local_tensor

    def _reductions(self, c):
        """How the squared norms of the local gradients add up to the model's: a list of
        (mesh, the mesh dims to sum over, [(plan, block, grad format)]), one entry per
        (mesh, sharded dims) in order of first appearance (the same on every rank).
        Parameters replicated over every mesh dim, and plain tensors, are counted once
        (mesh None): a plain tensor next to DTensors is taken to be replicated, as FSDP2
        keeps the parameters it does not shard."""
        out = []
        flat = [p for g in self.param_groups for p in g["params"]]
        for slot, p in zip(c.slots, flat):
            if slot is None:
                continue
            mesh, dims = None, ()
            if _is_dtensor(p):
                dims = tuple(d for d, pl in enumerate(p.placements) if pl.is_shard())
                mesh = p.device_mesh if dims else None
            block = (slot[0], slot[1], _formats.grad_format(_NAMES[p.dtype]))
            for m, ds, blocks in out:
                if ds == dims and (m is mesh or m == mesh):
                    blocks.append(block)
                    break
            else:
                out.append((mesh, dims, [block]))
        return out

    @staticmethod
    def _global_norm(c, all_grads, threads, scale):
        """The L2 norm of the gradients of the whole model (divided by the loss scale),
        from this rank's local shards: each rank's sum of squares (in double, by the C
        core's grad_stats) is gathered over the sharded mesh dims and summed in rank
        order, so every rank gets the same bits. inf or NaN (the sum itself) if a
        gradient is not finite, as the fused single-process norm."""
        total, nonfinite = 0.0, False
        for mesh, dims, blocks in c.reduce:
            per_plan = {}
            for pi, bi, fmt in blocks:
                g = all_grads[pi][bi]
                if g is not None:
                    arrays, fmts = per_plan.setdefault(pi, ([], []))
                    arrays.append(g)
                    fmts.append(fmt)
            sumsq, bad = 0.0, False
            for pi in sorted(per_plan):
                arrays, fmts = per_plan[pi]
                part, nf = _core.grad_stats(arrays, threads, formats=fmts)
                sumsq += part
                bad = bad or nf
            if mesh is not None:  # every rank calls this, with or without gradients
                sumsq, bad = _sum_over_mesh(mesh, dims, sumsq, bad)
            total += sumsq
            nonfinite = nonfinite or bad
        return total if nonfinite else math.sqrt(total) / scale

    @staticmethod
    def _sync_masters(c):
        """Before its first step a master is its parameter widened: a parameter changed
        after its state was made (Adagrad makes it in the constructor; a checkpoint may
        hold step 0) starts from its new value, as in fastadam.optim."""
        left = []
        for p, master, step in c.unsynced:
            if float(step) == 0.0:
                if p.grad is not None:
                    master.copy_(p.detach())
                left.append((p, master, step))
        c.unsynced = left

    # ------------------------------------------------------------- averages
    def averaged_params(self) -> list[_Tensor]:
        """The temporal averages of the parameters (Kingma & Ba, Sec. 7.2), for
        evaluation: new tensors ``param_ema / (1 - d**t)``, d the group's ``ema_decay``
        and t the number of averaged steps (``param_ema_step``), in the order of the
        param groups; a copy of the parameter where nothing has been averaged yet. The
        averages of float16/bfloat16 parameters are float32 (as their ``param_ema``; before
        any average, their ``master_param`` or the parameter widened).
        Raises ValueError unless ``ema_decay`` is set for every group. The same bits as
        :meth:`fastadam.optim.Optimizer.averaged_params`."""
        with self._lock:
            out = []
            for gi, group in enumerate(self.param_groups):
                d = group.get("ema_decay")
                if d is None:
                    raise ValueError(
                        f"param group {gi} has no ema_decay: set ema_decay (in "
                        f"[0, 1)) to keep temporal averages"
                    )
                d = check_ema_decay(_scalar(d))
                for i, p in enumerate(group["params"]):
                    s: Any = self.state.get(p)
                    ema: Any = s.get("param_ema") if isinstance(s, dict) else None
                    t = (
                        0
                        if ema is None
                        else _count_value(
                            s.get("param_ema_step", 0),
                            "param_ema_step",
                            f"param group {gi}, parameter {i}",
                        )
                    )
                    if t == 0:
                        m = s.get("master_param") if isinstance(s, dict) else None
                        out.append(
                            m.clone()
                            if isinstance(m, _Tensor)
                            else p.detach().to(_torch.float32)
                            if p.dtype in _HALF
                            else p.detach().clone()
                        )
                        continue
                    a = _view(ema)
                    avg = (a / a.dtype.type(1.0 - d**t)).astype(a.dtype)
                    r = _torch.from_numpy(avg)
                    r = _torch.view_as_complex(r) if p.is_complex() else r
                    if _is_dtensor(ema):  # laid out like the parameter, as param_ema
                        r = type(ema).from_local(
                            r,
                            ema.device_mesh,
                            ema.placements,
                            run_check=False,
                            shape=ema.shape,
                            stride=ema.stride(),
                        )
                    out.append(r)
            return out


# ===================================================================== the rules
class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015) as ``torch.optim.Adam``, on fastadam's fused C core.

    torch.optim.Adam's arguments:

    Args:
        params: iterable of parameters or of param-group dicts.
        lr (float or 0-dim Tensor): step size (default 1e-3).
        betas (tuple): (beta1, beta2), floats or 1-element tensors (default (0.9, 0.999)).
        eps (float): added to the denominator (default 1e-8).
        weight_decay (float): L2 penalty added to the gradient, or with
            ``decoupled_weight_decay=True`` (AdamW) ``p *= 1 - lr * weight_decay`` (default 0).
        amsgrad (bool): use the running maximum of ``exp_avg_sq`` (default False).
        foreach, fused: accepted for compatibility; no effect.
        maximize (bool): ascend instead of descend (default False).
        capturable, differentiable: must be False.
        decoupled_weight_decay (bool): AdamW's decay (default False).

    fastadam extras (keyword-only): ``max_grad_norm``, ``num_threads``, ``ema_decay`` (see
    :class:`Optimizer`) and ``eps_root`` (optax's epsilon inside the square root,
    ``sqrt(v_hat + eps_root) + eps``; 0, the default, is bitwise the plain update; a group
    option, in ``param_groups`` only when set).

    State (torch's): ``step``, ``exp_avg``, ``exp_avg_sq`` [, ``max_exp_avg_sq``]. Everything
    else -- param groups, schedulers, GradScaler, checkpoints, threads -- is documented on
    :class:`Optimizer`.
    """

    _rule = RULES["adam"]
    _extras = {"eps_root": 0.0, "ema_decay": None}
    _fixed = {"bias_correction": True, "eps_mode": "paper"}
    _setdefaults = {
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
    }
    _sparse = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        eps_root: float = 0.0,
        ema_decay: float | None = None,
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
                amsgrad=amsgrad,
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
                fused=fused,
                decoupled_weight_decay=decoupled_weight_decay,
                eps_root=eps_root,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )

    def _check_defaults(self, defaults):
        betas = defaults["betas"]
        try:
            beta_pair = tuple(betas)
            assert len(beta_pair) == 2
        except Exception:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        defaults["betas"] = beta_pair
        g = self._gather(defaults)
        self._torch_checks(g)
        # torch.optim.Adam's own rules for tensor betas
        for i, b in enumerate(beta_pair):
            if isinstance(b, _Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if isinstance(beta_pair[0], _Tensor) != isinstance(beta_pair[1], _Tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        defaults["betas"] = g["betas"] = tuple(
            b.squeeze() if isinstance(b, _Tensor) and b.dim() else b for b in beta_pair
        )
        self._fastadam_checks(g)
        return defaults


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter) as ``torch.optim.AdamW``: decoupled weight decay,
    ``weight_decay`` defaults to 1e-2. Everything else as :class:`Adam`."""

    _forced = {"decoupled_weight_decay": True}
    _setdefaults = dict(Adam._setdefaults, decoupled_weight_decay=True)

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        eps_root: float = 0.0,
        ema_decay: float | None = None,
        master_weights: bool = False,
        state_dtype: str | None = None,
        rounding: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            max_grad_norm=max_grad_norm,
            num_threads=num_threads,
            eps_root=eps_root,
            ema_decay=ema_decay,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum and Nesterov momentum as
    ``torch.optim.SGD`` (same signature and defaults), on fastadam's fused C core.

    With alpha = ``lr``, mu = ``momentum``, tau = ``dampening``, lambda = ``weight_decay``:
    g += lambda p; b = g at the buffer's first step, else b = mu b + (1 - tau) g; p -= alpha
    (g + mu b) (nesterov) or alpha b (see fastadam.reference.sgd_step). State (torch's):
    ``momentum_buffer``, only when momentum != 0 (no state at all otherwise); a buffer
    this optimizer made takes its first step as torch's ``buf = g``, one loaded from a
    checkpoint continues. torch.optim.SGD's sparse-gradient support is not offered.
    fastadam extras and everything else: :class:`Optimizer`.
    """

    _rule = RULES["sgd"]
    _setdefaults = {
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": False,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                foreach=foreach,
                differentiable=differentiable,
                fused=fused,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Adagrad(Optimizer):
    r"""AdaGrad (Duchi, Hazan & Singer 2011) as ``torch.optim.Adagrad`` (same signature and
    defaults), on fastadam's fused C core.

    With eta_t = lr / (1 + (t - 1) lr_decay): g += lambda p; s += g*g; p -= eta_t g /
    (sqrt(s) + eps) (see fastadam.reference.adagrad_step). State (torch's): ``step``,
    ``sum``, made by the constructor as torch does, ``sum`` at the constructor's
    ``initial_accumulator_value`` (torch ignores a group's own value; so does this class).
    torch.optim.Adagrad's sparse-gradient support is not offered. fastadam extras and
    everything else: :class:`Optimizer`.
    """

    _rule = RULES["adagrad"]
    _setdefaults = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}
    _eager = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                eps=eps,
                weight_decay=weight_decay,
                initial_accumulator_value=initial_accumulator_value,
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                fused=fused,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )

    def _initial(self, key, o):
        # torch.optim.Adagrad starts every sum at the constructor's value, whatever the
        # group's initial_accumulator_value says
        if key != "sum":
            return super()._initial(key, o)
        return float(_scalar(self.defaults["initial_accumulator_value"]))

    def share_memory(self) -> None:
        """As torch's: tensor.share_memory_() on the ``sum`` tensors (picked up by the
        next step: they move)."""
        with self._lock:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["sum"].share_memory_()


class RMSprop(Optimizer):
    r"""RMSprop (Tieleman & Hinton 2012; centered: Graves 2013) as ``torch.optim.RMSprop``
    (same signature and defaults), on fastadam's fused C core (see
    fastadam.reference.rmsprop_step). State (torch's): ``step``, ``square_avg``
    [, ``momentum_buffer`` when momentum > 0] [, ``grad_avg`` when centered]. fastadam
    extras (keyword-only) and everything else: :class:`Optimizer`.
    """

    _rule = RULES["rmsprop"]
    _setdefaults = {
        "momentum": 0,
        "centered": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }
    _sparse = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                alpha=alpha,
                eps=eps,
                centered=centered,
                weight_decay=weight_decay,
                capturable=capturable,
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Adamax(Optimizer):
    r"""AdaMax (Kingma & Ba 2015, Algorithm 2) as ``torch.optim.Adamax`` (same signature
    and defaults), on fastadam's fused C core (see fastadam.reference.adamax_step). State
    (torch's): ``step``, ``exp_avg``, ``exp_inf``. fastadam extras and everything else:
    :class:`Optimizer`.
    """

    _rule = RULES["adamax"]
    _setdefaults = {
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }
    _sparse = "Adamax does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                capturable=capturable,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class NAdam(Optimizer):
    r"""NAdam (Dozat 2016) as ``torch.optim.NAdam`` (same signature and defaults), on
    fastadam's fused C core (see fastadam.reference.nadam_step). State (torch's): ``step``,
    ``mu_product`` (a 0-dim tensor of torch's default scalar dtype, float32 unless the
    default dtype is float64, updated in double and rounded to it once per step), ``exp_avg``,
    ``exp_avg_sq``. fastadam extras and everything else: :class:`Optimizer`.
    """

    _rule = RULES["nadam"]
    _setdefaults = {
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
    }
    _sparse = "NAdam does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class RAdam(Optimizer):
    r"""RAdam (Liu et al. 2020) as ``torch.optim.RAdam`` (same signature and defaults), on
    fastadam's fused C core (see fastadam.reference.radam_step). State (torch's): ``step``,
    ``exp_avg``, ``exp_avg_sq``. fastadam extras and everything else: :class:`Optimizer`.
    """

    _rule = RULES["radam"]
    _setdefaults = {
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
        "capturable": False,
    }
    _sparse = "RAdam does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
                foreach=foreach,
                capturable=capturable,
                decoupled_weight_decay=decoupled_weight_decay,
                differentiable=differentiable,
                ema_decay=ema_decay,
            ),
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


class Lion(Optimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"); not in
    torch.optim, written in its style (lion-pytorch's signature and defaults)::

        p <- p * (1 - lr * weight_decay)
        p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
        m <- beta2 * m + (1 - beta2) * g                  (exp_avg)

    Exact operation order: fastadam.reference.lion_step. betas are checked in [0, 1] (the
    messages in torch.optim's style). State: ``exp_avg``. fastadam extras and everything
    else: :class:`Optimizer`.
    """

    _rule = RULES["lion"]
    _setdefaults = {"maximize": False}
    _sparse = "Lion does not support sparse gradients"

    def __init__(
        self,
        params: ParamsT,
        lr: float | _Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        maximize: bool = False,
        *,
        max_grad_norm: float | None = None,
        num_threads: int | None = None,
        ema_decay: float | None = None,
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
            max_grad_norm,
            num_threads,
            master_weights=master_weights,
            state_dtype=state_dtype,
            rounding=rounding,
            seed=seed,
        )


# ============================================================ FSDP2: full state_dicts
def _fqn_order(model, optimizer):
    """The fully qualified name of each parameter of `optimizer`, in param-group order
    (the order of the integer keys of ``optimizer.state_dict()``)."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"param group {gi}, parameter {i} of the optimizer is not a "
                    f"parameter of the model"
                )
            out.append(names[id(p)])
    return out


def _no_full_q8(optimizer, name):
    """Refuse 8-bit state of DTensor parameters in a full state_dict, on every rank alike
    (before any collective): its absmax blocks are 256 elements of each rank's local shard,
    so the gathered absmax would not be the full tensor's ceil(n / 256) blocks, and
    re-blocking (dequantize, requantize) would change the moments."""
    if optimizer._fmt.state_dtype != "8bit":
        return
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if _is_dtensor(p) and any(map(_formats.is_q8, optimizer._layout(p).states)):
                raise ValueError(
                    f"{name}: param group {gi}, parameter {i} ({_describe(p)}) has 8-bit "
                    f"state (state_dtype='8bit'), whose absmax is one per 256 elements of "
                    f"each rank's local shard: it has no full-tensor form (8-bit state "
                    f"cannot be resharded); checkpoint it with torch.distributed.checkpoint "
                    f"and resume on the same mesh (docs/engines.md, FSDP2)"
                )


def full_optim_state_dict(
    model: _torch.nn.Module, optimizer: Optimizer, *, rank0_only: bool = True
) -> dict[str, Any] | None:
    """The state of an optimizer over DTensor (FSDP2) parameters as an ordinary
    ``fastadam.torch`` state_dict: every state tensor gathered into a full, plain CPU
    tensor, keyed as ``optimizer.state_dict()`` keys them (0, 1, ... over the param
    groups in order), ``param_groups`` and ``"formats"`` as there. It loads with
    ``load_state_dict`` into the same fastadam.torch class built on the unsharded model
    (``cls(model.parameters(), ...)``, same formats), and, with the default formats, into
    the torch.optim class of the same name (its layout is torch's).

    Every rank must call it (the tensors are gathered with collectives). rank0_only: the
    dict is returned on rank 0 only (None on the others), which alone holds the full
    tensors (``StateDictOptions(cpu_offload=True)``); False: every rank gets it. Its
    tensors are copies: later steps do not change them.
    Built on ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which
    first takes a step with lr 0 and zero gradients if the optimizer has no state yet."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a fastadam.torch optimizer, got {type(optimizer).__name__}"
        )
    _no_full_q8(optimizer, "full_optim_state_dict")
    fqns = _fqn_order(model, optimizer)
    sd: dict[str, Any] = get_optimizer_state_dict(
        model,
        optimizer,
        options=StateDictOptions(full_state_dict=True, cpu_offload=bool(rank0_only)),
    )
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return None
    index = {name: i for i, name in enumerate(fqns)}
    # the gathered DTensors are new tensors; the others (step counts, the state of plain
    # parameters) are the optimizer's own, which its next step would change under the dict
    live = {id(v) for s in optimizer.state.values() if isinstance(s, dict) for v in s.values()}
    own = {
        k: {key: v.clone() if id(v) in live else v for key, v in entry.items()}
        if isinstance(entry, dict)
        else entry
        for k, entry in sd["state"].items()
    }
    out: dict[str, Any] = {
        "state": {index[k]: v for k, v in own.items()},
        "param_groups": [
            dict(g, params=[index[k] for k in g["params"]]) for g in sd["param_groups"]
        ],
    }
    out["state"] = dict(sorted(out["state"].items()))
    if optimizer._fmt != _DEFAULT_FORMATS:
        out["formats"] = optimizer.formats
    return out


def load_full_optim_state_dict(
    model: _torch.nn.Module, optimizer: Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load an ordinary ``fastadam.torch`` (or, with the default formats, torch.optim)
    state_dict -- one of :func:`full_optim_state_dict`, or of an optimizer built on the
    unsharded model -- into an optimizer over DTensor (FSDP2) parameters: each rank keeps
    its shard of every full tensor. Every rank must call it with the same dict. The
    integer keys are positions over the param groups, as ``state_dict()`` numbers them;
    ``"formats"`` must be this optimizer's (ValueError otherwise, before anything
    changes). Built on ``set_optimizer_state_dict(..., StateDictOptions(full_state_dict=
    True))``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a fastadam.torch optimizer, got {type(optimizer).__name__}"
        )
    if (
        not isinstance(state_dict, dict)
        or not isinstance(state_dict.get("state"), dict)
        or not isinstance(state_dict.get("param_groups"), (list, tuple))
    ):
        raise TypeError("state_dict must be a dict with a 'state' dict and a 'param_groups' list")
    saved = state_dict.get("formats", _DEFAULT_FORMATS.as_dict())
    if saved != optimizer.formats:
        raise ValueError(
            f"state_dict['formats'] is {saved}, this optimizer's are "
            f"{optimizer.formats}: a state_dict loads only into an optimizer "
            f"with the same master_weights, state_dtype, rounding and seed"
        )
    _no_full_q8(optimizer, "load_full_optim_state_dict")
    fqns = _fqn_order(model, optimizer)
    try:
        keys = [i for g in state_dict["param_groups"] for i in g["params"]]
        if sorted(keys) != list(range(len(fqns))) or any(
            k not in range(len(fqns)) for k in state_dict["state"]
        ):
            raise ValueError
    except (TypeError, ValueError, KeyError):
        raise ValueError(
            f"state_dict must number the {len(fqns)} parameters of this "
            f"optimizer 0 to {len(fqns) - 1} over its param groups"
        ) from None
    sd: dict[str, Any] = {
        "state": {fqns[k]: v for k, v in state_dict["state"].items()},
        "param_groups": [
            dict(g, params=[fqns[i] for i in g["params"]]) for g in state_dict["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, sd, options=StateDictOptions(full_state_dict=True))
