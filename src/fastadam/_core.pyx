# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin binding of the fastadam C core (csrc/fastadam.h).

Design: this module only checks, converts and calls. It acquires every buffer
through the buffer protocol (or, for exact NumPy arrays, reads the array's fields),
checks dtype, shape, contiguity, alignment, writability and aliasing *before* any
buffer is written, fills plain C structs, releases the GIL and makes ONE call into C
per step over all parameter blocks (one per plan when a torch model mixes dtypes).

A _Plan is built once per optimizer over its parameters and state. Per step:
- the gradients are acquired and checked (dtype, the parameter's shape, contiguity,
  alignment, and, by a binary search over the sorted output intervals, that no
  gradient overlaps a buffer the step writes); the step keeps a reference to every
  gradient (a tuple snapshot of the list) until the C call has returned, so another
  thread emptying the list cannot free a buffer under the kernel;
- with `groups` (the NumPy API), the plan first checks that the parameters are still
  the arrays it was built from and that they and the state arrays still have the data
  pointer, dtype, byte order, shape and flags it recorded; if not, the step returns
  None before touching anything and the caller rebuilds (or refuses);
- the C pass runs under one process-wide lock, so two steps never interleave, even of
  two optimizers that share a buffer; the step counts are committed in the same
  GIL-free section, so no Python code (and no KeyboardInterrupt) can fall between the
  update of the buffers and that of the counters.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_RECORDS_RO,
                             PyBuffer_IsContiguous)
from cpython.ref cimport PyObject
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.dict cimport PyDict_GetItem
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_acquire_lock, PyThread_release_lock, WAIT_LOCK)
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, qsort
from libc.math cimport sqrt, INFINITY

from fastadam._cfastadam cimport *
cimport numpy as cnp

cnp.import_array()

import os
import sys

VERSION = FA_VERSION.decode()
DEFAULT_CHUNK = FA_DEFAULT_CHUNK
ISA_NAMES = tuple(fa_isa_name(<fa_isa>i).decode() for i in range(FA_ISA_COUNT))
MAX_STEP = 2 ** 62  # step counts of the NumPy API are < MAX_STEP (int64 never overflows)
MAX_THREADS = 2 ** 31 - 1
# Storage formats of a stream (csrc/fastadam.h fa_format; docs/formats.md)
FMT_NATIVE = FA_FMT_NATIVE
FMT_BF16 = FA_FMT_BF16
FMT_F16 = FA_FMT_F16
FMT_Q8_SIGNED = FA_FMT_Q8_SIGNED
FMT_Q8_UNSIGNED = FA_FMT_Q8_UNSIGNED
Q8_BLOCK = FA_Q8_BLOCK
# The 8-bit lookup tables were built from the maps without a bucket holding two
# thresholds (fa_q8_init); checked by the tests.
Q8_TABLES_OK = fa_q8_init() == 0

cdef int64_t _MAX_STEP = 2 ** 62
cdef bint _LITTLE = sys.byteorder == "little"
_DTYPE_NAMES = ("float32", "float64")
RULE_NAMES = tuple(fa_rule_name(<fa_rule>i).decode() for i in range(FA_RULE_COUNT))


# ------------------------------------------------------------- the step lock, fork
# Every C update pass of the process runs under this lock: each pass already spreads
# over every core with OpenMP, so serialising passes costs little and guarantees that
# two steps never interleave on a shared buffer. It is taken and released without the
# GIL, so a thread waiting for it never blocks Python, and its holder never needs the
# GIL to let it go.
cdef PyThread_type_lock _step_lock = PyThread_allocate_lock()
# True in a process made by fork(): GNU libgomp's thread pool does not survive a fork
# (the child's first parallel region waits forever for threads that do not exist), so
# a forked child runs every pass on its calling thread.
cdef bint _forked = False

if _step_lock == NULL:
    raise MemoryError("fastadam: cannot allocate the step lock")


def _before_fork():
    # Wait for a pass in flight: the child then inherits neither a half-done update nor
    # a lock held by a thread that does not exist there.
    with nogil:
        PyThread_acquire_lock(_step_lock, WAIT_LOCK)


def _after_fork_in_parent():
    PyThread_release_lock(_step_lock)


def _after_fork_in_child():
    global _forked
    _forked = True
    PyThread_release_lock(_step_lock)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def forked():
    """True in a child made by fork(): every step then runs serially (see above)."""
    return bool(_forked)


# ----------------------------------------------------------------------- dispatch
def isa_index(str name):
    """Index of a SIMD path name ('scalar', 'sse2', 'avx2', 'avx512', 'neon')."""
    try:
        return ISA_NAMES.index(name)
    except ValueError:
        raise ValueError(f"unknown SIMD path {name!r}; expected one of "
                         f"{', '.join(ISA_NAMES)} or 'auto'") from None


def isa_compiled(int isa):
    return bool(fa_isa_compiled(<fa_isa>isa))


def isa_supported(int isa):
    return bool(fa_isa_supported(<fa_isa>isa))


def select_isa(int isa):
    """Choose the path used by default (-1: the best usable). Returns its index."""
    cdef int r = fa_init(<fa_isa>isa)
    if r < 0:
        raise RuntimeError("SIMD path not usable")  # callers check first
    return r


def current_isa():
    return <int>fa_isa_current()


def openmp():
    return bool(fa_openmp())


def max_threads():
    return fa_max_threads()


def thread_cap():
    return fa_thread_cap()


def prefetch_window():
    """(lo, hi): a step prefetches in software when its state bytes lie in (lo, hi] (fastadam.h)."""
    cdef size_t lo = 0, hi = 0
    fa_prefetch_window(&lo, &hi)
    return lo, hi


cdef int _threads(int num_threads) except -2:
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    return 1 if _forked else num_threads


cdef int _check_isa(int isa) except -1:
    if isa != -1 and not (0 <= isa < FA_ISA_COUNT and fa_isa_usable(<fa_isa>isa)):
        raise ValueError(f"SIMD path {isa} is not usable on this machine")
    return 0


# ------------------------------------------------------------------------ helpers
cdef str _describe(object obj):
    dt = getattr(obj, "dtype", None)
    if dt is not None:
        return f"{type(obj).__name__} of dtype {dt}"
    return type(obj).__name__

cdef str _label(str base, Py_ssize_t i, bint single):
    return base if single else f"{base}s[{i}]"

cdef int _dtype_code(const Py_buffer *v) noexcept:
    """0 for float32, 1 for float64, -1 for anything else."""
    cdef const char *f = v.format
    if f == NULL:
        return -1
    if f[0] == b'@' or f[0] == b'=' or (f[0] == b'<' and _LITTLE) or (f[0] == b'>' and not _LITTLE):
        f += 1
    if f[0] == 0 or f[1] != 0:
        return -1
    if f[0] == b'f' and v.itemsize == 4:
        return 0
    if f[0] == b'd' and v.itemsize == 8:
        return 1
    return -1

cdef inline bint _same_shape(const Py_buffer *v, int ndim, const Py_ssize_t *shape) noexcept:
    cdef int k
    if v.ndim != ndim:
        return False
    for k in range(ndim):
        if v.shape[k] != shape[k]:
            return False
    return True

cdef int _check_view(const Py_buffer *view, str label, bint writable, int ndim,
                     const Py_ssize_t *shape) except -1:
    """The checks every acquired buffer ends with: writable if written, the shape."""
    if writable and view.readonly:
        raise ValueError(f"{label} is updated in place and must be writable; "
                         f"got a read-only buffer")
    if ndim >= 0 and not _same_shape(view, ndim, shape):
        raise ValueError(f"{label} must have the shape of its parameter "
                         f"{tuple(shape[k] for k in range(ndim))}; "
                         f"got {tuple(view.shape[k] for k in range(view.ndim))}")
    return 0


cdef int _acquire(Py_buffer *view, object obj, str label, bint writable, int dtype,
                  int ndim, const Py_ssize_t *shape) except -1:
    """Acquire obj's buffer into *view and check it; on error nothing is held.

    label: the argument's name in errors (callers on a hot path try _fill_from_ndarray
    first and format a label only when that fails; see _Plan._acquire_grad). dtype: the
    required dtype code, or -1 for "float32 or float64". ndim < 0: any shape; else the
    shape this buffer must have.
    """
    cdef int code
    if cnp.PyArray_CheckExact(obj):
        code = _fill_from_ndarray(view, <cnp.ndarray>obj)
        if (code >= 0 and (dtype < 0 or code == dtype) and not (writable and view.readonly)
                and (ndim < 0 or _same_shape(view, ndim, shape))):
            return code
        # fall through: the general path below produces the error message
    if obj is None:
        raise TypeError(f"{label} must be a float32 or float64 array, got None")
    if cnp.PyArray_Check(obj) and cnp.PyArray_TYPE(<cnp.ndarray>obj) not in (
            cnp.NPY_FLOAT32, cnp.NPY_FLOAT64):
        want = _DTYPE_NAMES[dtype] if dtype >= 0 else "float32 or float64"
        raise TypeError(f"{label} must have dtype {want}; got {_describe(obj)}")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    except Exception:
        raise TypeError(f"{label} must support the buffer protocol (a NumPy array, say); "
                        f"got {_describe(obj)}") from None
    try:
        code = _dtype_code(view)
        if code < 0 or (dtype >= 0 and code != dtype):
            want = _DTYPE_NAMES[dtype] if dtype >= 0 else "float32 or float64"
            raise TypeError(f"{label} must have dtype {want} (all buffers of a step share "
                            f"one dtype); got {_describe(obj)} with format "
                            f"{(view.format or b'?').decode(errors='replace')!r}")
        if not PyBuffer_IsContiguous(view, b'C'):
            raise ValueError(f"{label} must be C-contiguous; got a strided view "
                             f"(use numpy.ascontiguousarray and keep that array)")
        if <uintptr_t>view.buf % <uintptr_t>view.itemsize != 0:
            raise ValueError(f"{label} is not aligned to its element size ({view.itemsize} "
                             f"bytes): its data starts at an odd address (a view at a byte "
                             f"offset, say); copy it with numpy.ascontiguousarray(...) or "
                             f"numpy.require(..., requirements='A')")
        _check_view(view, label, writable, ndim, shape)
    except BaseException:
        PyBuffer_Release(view)
        raise
    return code


cdef int _fill_from_ndarray(Py_buffer *view, cnp.ndarray a) noexcept:
    """The fast path for exact numpy.ndarray (no buffer export: ~20 ns instead of ~150 ns
    per tensor per step). Fills the Py_buffer fields the checks and the call read and
    leaves view.obj as it is: NULL, since every view slot is zeroed at allocation and
    PyBuffer_Release resets it, so releasing this view is a no-op. The caller holds a
    reference to the array for as long as the pointer is used (view.shape points into
    the array and is read only before the caller returns). Returns the dtype code, or -1
    when the array is not a C-contiguous, aligned, native-order float32/float64 array
    (the general path then reports what is wrong)."""
    cdef int t = cnp.PyArray_TYPE(a)
    cdef int code = 0 if t == cnp.NPY_FLOAT32 else (1 if t == cnp.NPY_FLOAT64 else -1)
    if (code < 0 or not cnp.PyArray_ISNOTSWAPPED(a) or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or <uintptr_t>cnp.PyArray_DATA(a) % (4 if code == 0 else 8) != 0):
        return -1
    view.buf = cnp.PyArray_DATA(a)
    view.itemsize = 4 if code == 0 else 8
    view.len = cnp.PyArray_SIZE(a) * view.itemsize
    view.readonly = not cnp.PyArray_ISWRITEABLE(a)
    view.ndim = cnp.PyArray_NDIM(a)
    view.shape = <Py_ssize_t *>cnp.PyArray_DIMS(a)
    view.strides = NULL
    view.format = NULL
    return code


ctypedef struct _Interval:
    uintptr_t start, end
    size_t block
    int which  # the slot (0 param, ...): _Plan.names[which]

cdef int _cmp_interval(const void *a, const void *b) noexcept nogil:
    cdef uintptr_t x = (<const _Interval *>a).start, y = (<const _Interval *>b).start
    return (x > y) - (x < y)


# What a plan recorded of each NumPy array it writes, re-checked at every step.
ctypedef struct _Sig:
    PyObject *obj          # borrowed: _Plan.arrays keeps it alive; NULL: not an ndarray
    void *data
    int typenum

cdef int _SIG_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_WRITEABLE | cnp.NPY_ARRAY_ALIGNED


# A count kept outside the plan: a 0-d array (the torch API's state['step'] tensors).
ctypedef struct _Mirror:
    void *ptr              # NULL: the plan's own int64 count
    int type               # 0 float32, 1 float64, 2 int64

cdef inline double _mirror_get(const _Mirror *m) noexcept nogil:
    if m.type == 0:
        return (<float *>m.ptr)[0]
    if m.type == 1:
        return (<double *>m.ptr)[0]
    return <double>(<int64_t *>m.ptr)[0]

cdef inline double _mirror_next(const _Mirror *m) noexcept nogil:
    # torch: step_t += 1, in the tensor's dtype
    if m.type == 0:
        return <float>((<float *>m.ptr)[0] + <float>1.0)
    if m.type == 1:
        return (<double *>m.ptr)[0] + 1.0
    return <double>((<int64_t *>m.ptr)[0] + 1)

cdef inline void _mirror_set(const _Mirror *m, double x) noexcept nogil:
    if m.type == 0:
        (<float *>m.ptr)[0] = <float>x
    elif m.type == 1:
        (<double *>m.ptr)[0] = x
    else:
        (<int64_t *>m.ptr)[0] = <int64_t>x


cdef int _mirror_from(_Mirror *m, object a, str label, bint counts) except -1:
    """Point m at a writable 0-d array's memory (float32/float64, or int64 for counts)."""
    cdef int t
    if not (cnp.PyArray_Check(a) and cnp.PyArray_NDIM(<cnp.ndarray>a) == 0
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a)
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>a)):
        raise TypeError(f"{label} must be a writable 0-d array")
    t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT32:
        m.type = 0
    elif t == cnp.NPY_FLOAT64:
        m.type = 1
    elif t == cnp.NPY_INT64 and counts:
        m.type = 2
    else:
        raise TypeError(f"{label} must be float32 or float64" + (" or int64" if counts else ""))
    m.ptr = cnp.PyArray_DATA(<cnp.ndarray>a)
    return 0


cdef tuple _FMT_NAMES = ("float32", "bfloat16", "float16", "uint8 (8-bit codes)",
                         "uint8 (8-bit codes)")


cdef bint _typenum_ok(int fmt, cnp.ndarray a) except -1:
    """An ndarray's dtype may hold stream format fmt (2-byte: float16, bfloat16 or an
    int16/uint16 view of either; 8-bit: uint8)."""
    cdef int t = cnp.PyArray_TYPE(a)
    if fmt == FA_FMT_F16:
        return t == cnp.NPY_FLOAT16 or t == cnp.NPY_INT16 or t == cnp.NPY_UINT16
    if fmt == FA_FMT_BF16:
        return (t == cnp.NPY_INT16 or t == cnp.NPY_UINT16
                or (cnp.PyArray_ITEMSIZE(a) == 2 and a.dtype.name == "bfloat16"))
    return t == cnp.NPY_UINT8


cdef int _acquire_stored(Py_buffer *view, object obj, str label, bint writable, int fmt,
                         int ndim, const Py_ssize_t *shape) except -1:
    """_acquire for a stream of format fmt (FA_FMT_*): NATIVE is float32 (_acquire); a
    16-bit or 8-bit stream must be a C-contiguous, aligned, native-order NumPy array of a
    dtype that holds it (_typenum_ok). The view is filled from the array's fields (no
    buffer export: NumPy cannot export bfloat16), so releasing it is a no-op; the caller
    keeps the array alive."""
    cdef cnp.ndarray a
    cdef int size = 2 if fmt == FA_FMT_BF16 or fmt == FA_FMT_F16 else 1
    if fmt == FA_FMT_NATIVE:
        return _acquire(view, obj, label, writable, 0, ndim, shape)
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{label} must be a NumPy array of dtype {_FMT_NAMES[fmt]}; got "
                        f"{_describe(obj)}")
    a = <cnp.ndarray>obj
    if not _typenum_ok(fmt, a):
        raise TypeError(f"{label} must have dtype {_FMT_NAMES[fmt]}; got {_describe(obj)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{label} must be C-contiguous; got a strided view")
    if <uintptr_t>cnp.PyArray_DATA(a) % <uintptr_t>size != 0:
        raise ValueError(f"{label} is not aligned to its element size ({size} bytes)")
    if not cnp.PyArray_ISNOTSWAPPED(a):
        raise ValueError(f"{label} must be in native byte order")
    view.buf = cnp.PyArray_DATA(a)
    view.itemsize = size
    view.len = cnp.PyArray_SIZE(a) * size
    view.readonly = not cnp.PyArray_ISWRITEABLE(a)
    view.ndim = cnp.PyArray_NDIM(a)
    view.shape = <Py_ssize_t *>cnp.PyArray_DIMS(a)
    view.strides = NULL
    view.format = NULL
    _check_view(view, label, writable, ndim, shape)
    return 0


# What the GIL-free part of a step needs of one plan.
ctypedef struct _Run:
    fa_rule rule
    fa_block *active
    size_t nactive
    size_t *active_index    # block index of each active block
    fa_options *options
    size_t ngroups
    int dtype
    double *workspace
    int64_t *steps          # the plan's own counts (where a block has no mirror)
    _Mirror *step_mirrors   # one per block
    int64_t *ema_steps
    _Mirror *ema_mirrors
    _Mirror *scalars        # the rule's per-block scalar (ptr NULL: the rule has none)
    int64_t *step_count


# -------------------------------------------------------------------------- plan
# Each block writes up to _W buffers, its "slots": the parameter, the rule's state
# streams (FA_MAX_STATE), and param_ema.
# With storage formats, also the float32 master weights and the 8-bit state streams'
# block maxima.
cdef int _SLOT_EMA = FA_MAX_STATE + 1
cdef int _SLOT_MASTER = FA_MAX_STATE + 2
cdef int _SLOT_ABSMAX = FA_MAX_STATE + 3  # + k for state stream k
cdef int _W = 2 * FA_MAX_STATE + 3
cdef unsigned _EMA_BIT = 1u << FA_MAX_STATE  # in the masks of needed / present slots

cdef inline int _slot_stream(int w) noexcept:
    if w == 0:
        return FA_PARAM
    if w == _SLOT_EMA:
        return FA_EMA
    return FA_STATE0 + w - 1


cdef class _Plan:
    """Many parameter blocks of one update rule and their state, checked once.

    _Plan(rule, names, params, states, emas, groups, ngroups, single=False, labels=None,
          step_mirrors=None, scalar_mirrors=None, ema_mirrors=None, formats=None, masters=None,
    absmaxes=None, stochastic=False, seed=0, indices=None)
    rule: an fa_rule number; names: the names of its state streams (for errors), at most
    FA_MAX_STATE; states[i]: block i's state arrays, one per name, None where absent (a
    stream the block's options require is checked at every step); emas: one array or
    None per block (param_ema), or None; groups[i] is the parameter group of block i.
    labels: one string per block naming the user's parameter in errors (else
    "params[i]"). step_mirrors / ema_mirrors: None, or one writable 0-d array (float32,
    float64 or int64) per block, or None for a block: the torch API's state['step'] and
    ema counts live there, read before and written after each step as torch's
    ``step_t += 1`` (in the array's dtype); without one, a block keeps an integer count
    < 2**62 here. scalar_mirrors: one writable 0-d float32/float64 array per block, for a
    rule that keeps a per-block scalar (NAdam's mu_product); it is read before and
    written after each step (fa_scalar_after).

    Storage formats (docs/formats.md; the plan then computes in float32): formats[i] =
    (param format, one format per state name), FMT_* codes; a FMT_NATIVE stream is a
    float32 array, a 16-bit one any 2-byte array that can hold it (float16, bfloat16,
    int16/uint16 views), an 8-bit one uint8. masters[i]: None or the float32 master of a
    16-bit parameter (the rule updates it; the parameter is written as its rounded
    value). absmaxes[i]: per state name, the float32 block maxima (ceil(n/256)) of an
    8-bit stream, else None. stochastic, seed: how 16-bit stores round; indices[i]: the
    parameter's index in the optimizer (the random bits' key). A grad of a 16-bit
    parameter may be float32 or of the parameter's own dtype.
    """
    cdef size_t n, ngroups, nintervals, nstate
    cdef fa_rule rule
    cdef int dtype
    cdef bint single, busy
    cdef Py_buffer *out            # _W per block
    cdef char *held                # which of out[] are acquired
    cdef _Sig *sigs                # _W per block
    cdef PyObject **param_objs     # borrowed (see arrays): the parameters, in order
    cdef int *ndims                # each block's shape, copied at build
    cdef Py_ssize_t *shapes        # (the arrays' own dims may be reallocated)
    cdef size_t *shape_at
    cdef size_t *group_sizes       # blocks per group, in order (the NumPy API's check)
    cdef Py_buffer *grad_views     # 1 per block, held only during a step
    cdef fa_block *blocks
    cdef fa_block *active
    cdef size_t *active_index
    cdef fa_options *options
    cdef _Interval *intervals
    cdef double *workspace         # per-chunk sums for fa_grad_stats
    cdef int64_t *steps
    cdef int64_t *ema_steps
    cdef _Mirror *step_mirrors
    cdef _Mirror *ema_mirrors
    cdef _Mirror *scalars
    cdef unsigned *required        # per group: the slots its options need (this step)
    cdef unsigned *present         # per block: the slots it has
    cdef int64_t _step_count
    cdef _Run run
    cdef readonly tuple names      # the slots' names: param, the state streams, param_ema
    cdef readonly tuple arrays     # keeps every state object alive
    cdef readonly object labels
    cdef public object last_grad_norm
    cdef readonly bint formatted   # built with formats: float32 compute, per-stream storage
    cdef int *grad16               # per block: the 16-bit format a grad of its dtype has, or 0
    cdef int *param_typenum        # per block: its parameter's dtype number

    def __cinit__(self, int rule, tuple names, list params, list states, emas, list groups,
                  Py_ssize_t ngroups, bint single=False, labels=None, step_mirrors=None,
                  scalar_mirrors=None, ema_mirrors=None, formats=None, masters=None,
                  absmaxes=None, bint stochastic=False, seed=0, indices=None):
        cdef Py_ssize_t n = len(params), i, j, k
        cdef int fmt
        cdef size_t nq
        cdef Py_ssize_t qshape[1]
        cdef uint64_t seed64
        cdef Py_buffer *v
        cdef int which
        cdef size_t total = 0, nshape = 0
        self.n = n
        self.single = single
        self.dtype = -1
        if not (0 <= rule < FA_RULE_COUNT):
            raise ValueError(f"rule must be in [0, {FA_RULE_COUNT}), got {rule}")
        self.rule = <fa_rule>rule
        if len(names) > FA_MAX_STATE or len(names) > fa_rule_nstate(self.rule):
            raise ValueError(f"rule {fa_rule_name(self.rule).decode()} has at most "
                             f"{fa_rule_nstate(self.rule)} state streams, got names {names}")
        self.nstate = len(names)
        pad = (None,) * (FA_MAX_STATE - len(names))
        self.names = (("param",) + names + pad + ("param_ema", "master_param")
                      + tuple(f"{x}_absmax" for x in names) + pad)
        self.formatted = formats is not None
        if not self.formatted and (masters is not None or absmaxes is not None):
            raise ValueError("masters and absmaxes need formats")
        for lst, what in ((formats, "formats"), (masters, "masters"), (absmaxes, "absmaxes"),
                          (indices, "indices")):
            if lst is not None and len(lst) != n:
                raise ValueError(f"{what} must have one entry per parameter")
        if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not (0 <= seed.__index__() < 2 ** 64):
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        seed64 = <uint64_t>seed.__index__()
        if emas is None:
            emas = [None] * n
        if not (len(states) == len(emas) == len(groups) == n):
            raise ValueError("params, states, emas and groups must have one entry per "
                             "parameter")
        for lst, what in ((labels, "labels"), (step_mirrors, "step_mirrors"),
                          (scalar_mirrors, "scalar_mirrors"), (ema_mirrors, "ema_mirrors")):
            if lst is not None and len(lst) != n:
                raise ValueError(f"{what} must have one entry per parameter")
        if fa_rule_has_scalar(self.rule) and scalar_mirrors is None:
            raise ValueError(f"rule {fa_rule_name(self.rule).decode()} needs scalar_mirrors")
        if ngroups < 1:
            raise ValueError("ngroups must be >= 1")
        self.labels = labels
        self.ngroups = ngroups
        self.out = <Py_buffer *>calloc(_W * n + 1, sizeof(Py_buffer))
        self.held = <char *>calloc(_W * n + 1, 1)
        self.sigs = <_Sig *>calloc(_W * n + 1, sizeof(_Sig))
        self.param_objs = <PyObject **>calloc(n + 1, sizeof(PyObject *))
        self.ndims = <int *>calloc(n + 1, sizeof(int))
        self.shape_at = <size_t *>calloc(n + 1, sizeof(size_t))
        self.group_sizes = <size_t *>calloc(ngroups, sizeof(size_t))
        self.grad_views = <Py_buffer *>calloc(n + 1, sizeof(Py_buffer))
        self.blocks = <fa_block *>calloc(n + 1, sizeof(fa_block))
        self.active = <fa_block *>calloc(n + 1, sizeof(fa_block))
        self.active_index = <size_t *>calloc(n + 1, sizeof(size_t))
        self.options = <fa_options *>calloc(ngroups, sizeof(fa_options))
        self.intervals = <_Interval *>calloc(_W * n + 1, sizeof(_Interval))
        self.steps = <int64_t *>calloc(n + 1, sizeof(int64_t))
        self.ema_steps = <int64_t *>calloc(n + 1, sizeof(int64_t))
        self.step_mirrors = <_Mirror *>calloc(n + 1, sizeof(_Mirror))
        self.ema_mirrors = <_Mirror *>calloc(n + 1, sizeof(_Mirror))
        self.scalars = <_Mirror *>calloc(n + 1, sizeof(_Mirror))
        self.required = <unsigned *>calloc(ngroups, sizeof(unsigned))
        self.present = <unsigned *>calloc(n + 1, sizeof(unsigned))
        self.grad16 = <int *>calloc(n + 1, sizeof(int))
        self.param_typenum = <int *>calloc(n + 1, sizeof(int))
        if (self.grad16 == NULL or self.param_typenum == NULL or self.required == NULL
                or self.present == NULL or self.out == NULL or self.held == NULL
                or self.sigs == NULL or self.ndims == NULL
                or self.param_objs == NULL
                or self.shape_at == NULL or self.group_sizes == NULL
                or self.grad_views == NULL or self.blocks == NULL or self.active == NULL
                or self.active_index == NULL or self.options == NULL
                or self.intervals == NULL or self.steps == NULL or self.ema_steps == NULL
                or self.step_mirrors == NULL or self.ema_mirrors == NULL
                or self.scalars == NULL):
            raise MemoryError()
        self.arrays = (tuple(params), tuple(tuple(s) for s in states), tuple(emas),
                       tuple(step_mirrors or ()), tuple(scalar_mirrors or ()),
                       tuple(ema_mirrors or ()), tuple(masters or ()),
                       tuple(tuple(a) if a is not None else None for a in (absmaxes or ())))
        if self.formatted:
            self.dtype = 0
        params = list(self.arrays[0])
        for j in range(ngroups):
            self.options[j].grad_scale = 1.0
        for i in range(n):
            g = groups[i]
            if not (0 <= g < ngroups):
                raise ValueError(f"groups[{i}] = {g} is not a group index")
            if i > 0 and g < groups[i - 1]:
                raise ValueError("groups must be in ascending order")
            self.group_sizes[g] += 1
            st = self.arrays[1][i]
            if len(st) != self.nstate:
                raise ValueError(f"states[{i}] must have one entry per state name {names}")
            pad = (None,) * (FA_MAX_STATE - self.nstate)
            fm = self._check_formats(formats, i) if self.formatted else (0,) * (1 + FA_MAX_STATE)
            master = self.arrays[6][i] if masters is not None else None
            am = self.arrays[7][i] if absmaxes is not None else None
            am = (None,) * self.nstate if am is None else am
            if len(am) != self.nstate:
                raise ValueError(f"absmaxes[{i}] must have one entry per state name {names}")
            if master is not None and fm[0] == FA_FMT_NATIVE:
                raise ValueError(f"{self._name('master_param', i)}: master weights are for "
                                 f"16-bit (float16/bfloat16) parameters only")
            objs = (params[i],) + st + pad + (self.arrays[2][i], master) + am + pad
            self.param_objs[i] = <PyObject *>params[i]
            for which in range(_W):
                if which > 0 and objs[which] is None:
                    continue
                v = &self.out[_W * i + which]
                label = self._name(self.names[which], i)
                if which >= _SLOT_ABSMAX:
                    if fm[which - _SLOT_ABSMAX + 1] < FA_FMT_Q8_SIGNED:
                        raise ValueError(f"{label} is given for a stream that is not 8-bit")
                    nq = (self.blocks[i].n + FA_Q8_BLOCK - 1) // FA_Q8_BLOCK
                    qshape[0] = <Py_ssize_t>nq
                    _acquire(v, objs[which], label, True, 0, 1, qshape)
                elif not self.formatted:
                    self.dtype = _acquire(v, objs[which], label, True, self.dtype,
                                          -1 if which == 0 else self.out[_W * i].ndim,
                                          self.out[_W * i].shape)
                else:
                    fmt = fm[which] if which <= FA_MAX_STATE else FA_FMT_NATIVE
                    _acquire_stored(v, objs[which], label, True, fmt,
                                    -1 if which == 0 else self.out[_W * i].ndim,
                                    self.out[_W * i].shape)
                self.held[_W * i + which] = 1
                if which == 0:
                    self.blocks[i].n = <size_t>(v.len // v.itemsize)
                if cnp.PyArray_Check(objs[which]):
                    self.sigs[_W * i + which].obj = <PyObject *>objs[which]
                    self.sigs[_W * i + which].data = v.buf
                    self.sigs[_W * i + which].typenum = cnp.PyArray_TYPE(<cnp.ndarray>objs[which])
                if v.len > 0:
                    self.intervals[self.nintervals].start = <uintptr_t>v.buf
                    self.intervals[self.nintervals].end = <uintptr_t>v.buf + <uintptr_t>v.len
                    self.intervals[self.nintervals].block = i
                    self.intervals[self.nintervals].which = which
                    self.nintervals += 1
                if which == _SLOT_MASTER:  # the rule updates the master; the param is its image
                    self.blocks[i].image = self.blocks[i].stream[FA_PARAM]
                    self.blocks[i].image_format = <unsigned char>fm[0]
                    self.blocks[i].stream[FA_PARAM] = v.buf
                    self.blocks[i].format[FA_PARAM] = FA_FMT_NATIVE
                elif which >= _SLOT_ABSMAX:
                    self.blocks[i].absmax[FA_STATE0 + which - _SLOT_ABSMAX] = <float *>v.buf
                else:
                    self.blocks[i].stream[_slot_stream(which)] = v.buf
                    if which <= FA_MAX_STATE:
                        self.blocks[i].format[_slot_stream(which)] = <unsigned char>fm[which]
                if 0 < which <= _SLOT_EMA:
                    self.present[i] |= 1u << (which - 1)  # state k: bit k; param_ema: _EMA_BIT
            for k in range(self.nstate):
                if (fm[1 + k] >= FA_FMT_Q8_SIGNED and self.blocks[i].stream[FA_STATE0 + k] != NULL
                        and self.blocks[i].absmax[FA_STATE0 + k] == NULL):
                    raise ValueError(f"{self._name(self.names[_SLOT_ABSMAX + k], i)} is "
                                     f"required: {self._name(names[k], i)} is 8-bit")
            if self.formatted:
                self.param_typenum[i] = cnp.PyArray_TYPE(<cnp.ndarray>params[i])
                self.grad16[i] = fm[0] if fm[0] in (FA_FMT_BF16, FA_FMT_F16) else 0
                self.blocks[i].stochastic = stochastic
                j = i if indices is None else indices[i]
                if j < 0:
                    raise ValueError(f"indices[{i}] must be >= 0, got {j}")
                self.blocks[i].rng_base = fa_rng_base(seed64, <uint64_t>j)
            self.ndims[i] = self.out[_W * i].ndim
            self.shape_at[i] = nshape
            nshape += <size_t>self.out[_W * i].ndim
            self.blocks[i].options = &self.options[g]
            self.blocks[i].step = 0
            self.blocks[i].scalar = 0
            if step_mirrors is not None and step_mirrors[i] is not None:
                _mirror_from(&self.step_mirrors[i], step_mirrors[i], f"step_mirrors[{i}]", True)
            if ema_mirrors is not None and ema_mirrors[i] is not None:
                _mirror_from(&self.ema_mirrors[i], ema_mirrors[i], f"ema_mirrors[{i}]", True)
            if fa_rule_has_scalar(self.rule):
                _mirror_from(&self.scalars[i], scalar_mirrors[i], f"scalar_mirrors[{i}]", False)
        # The shapes are copied: the views' shape pointers of exact ndarrays point into
        # the arrays, whose dims a user may reallocate (p.shape = ...) at any time.
        self.shapes = <Py_ssize_t *>calloc(nshape + 1, sizeof(Py_ssize_t))
        if self.shapes == NULL:
            raise MemoryError()
        for i in range(n):
            for k in range(self.ndims[i]):
                self.shapes[self.shape_at[i] + k] = self.out[_W * i].shape[k]
        for i in range(n):
            total += self.blocks[i].n
        self.workspace = <double *>calloc(fa_grad_stats_workspace(total) + 1, sizeof(double))
        if self.workspace == NULL:
            raise MemoryError()
        # Every buffer the step writes must be disjoint from every other one.
        qsort(self.intervals, self.nintervals, sizeof(_Interval), _cmp_interval)
        for j in range(1, <Py_ssize_t>self.nintervals):
            if self.intervals[j].start < self.intervals[j - 1].end:
                a = self._interval_label(j - 1)
                b = self._interval_label(j)
                if a == b:
                    raise ValueError(f"{a} is given twice")
                raise ValueError(f"{a} and {b} share memory; every parameter and state "
                                 f"buffer must be a distinct array")
        self.run.rule = self.rule
        self.run.active = self.active
        self.run.active_index = self.active_index
        self.run.options = self.options
        self.run.ngroups = self.ngroups
        self.run.dtype = self.dtype
        self.run.workspace = self.workspace
        self.run.steps = self.steps
        self.run.step_mirrors = self.step_mirrors
        self.run.ema_steps = self.ema_steps
        self.run.ema_mirrors = self.ema_mirrors
        self.run.scalars = self.scalars
        self.run.step_count = &self._step_count

    cdef tuple _check_formats(self, formats, Py_ssize_t i):
        """formats[i] as a tuple of 1 + FA_MAX_STATE valid codes (absent states: 0)."""
        f = formats[i]
        if not isinstance(f, tuple) or len(f) != 1 + self.nstate:
            raise ValueError(f"formats[{i}] must be a tuple (param format, one per state "
                             f"name {self.names[1:1 + self.nstate]}), got {f!r}")
        for k, x in enumerate(f):
            if isinstance(x, bool) or not isinstance(x, int) or not (0 <= x < FA_FMT_COUNT):
                raise ValueError(f"formats[{i}][{k}] must be an FMT_* code, got {x!r}")
        if f[0] >= FA_FMT_Q8_SIGNED:
            raise ValueError(f"formats[{i}][0]: a parameter cannot be 8-bit")
        return f + (0,) * (FA_MAX_STATE - self.nstate)

    cdef str _name(self, str base, Py_ssize_t i):
        if self.labels is not None:
            return self.labels[i] if base == "param" else f"{base} of {self.labels[i]}"
        return _label(base, i, self.single)

    cdef str _interval_label(self, size_t j):
        return self._name(self.names[self.intervals[j].which], self.intervals[j].block)

    def __dealloc__(self):
        cdef size_t i
        if self.held != NULL:
            for i in range(_W * self.n):
                if self.held[i]:
                    PyBuffer_Release(&self.out[i])
        free(self.out)
        free(self.held)
        free(self.sigs)
        free(self.param_objs)
        free(self.ndims)
        free(self.shapes)
        free(self.shape_at)
        free(self.group_sizes)
        free(self.grad_views)
        free(self.blocks)
        free(self.active)
        free(self.active_index)
        free(self.options)
        free(self.intervals)
        free(self.workspace)
        free(self.steps)
        free(self.ema_steps)
        free(self.step_mirrors)
        free(self.ema_mirrors)
        free(self.scalars)
        free(self.required)
        free(self.present)
        free(self.grad16)
        free(self.param_typenum)

    @property
    def dtype(self):
        return _DTYPE_NAMES[self.dtype] if self.dtype >= 0 else None

    def __len__(self):
        return self.n

    @property
    def step_count(self):
        """Steps taken (the NumPy API's optimizer-level count), committed with the buffers."""
        return self._step_count

    @step_count.setter
    def step_count(self, value):
        self._step_count = _check_count("step_count", value)

    def get_steps(self):
        """Each block's step count (its mirror's value where it has one)."""
        return [_mirror_get(&self.step_mirrors[i]) if self.step_mirrors[i].ptr != NULL
                else self.steps[i] for i in range(self.n)]

    def get_ema_steps(self):
        """Each block's count of updates of its param_ema."""
        return [_mirror_get(&self.ema_mirrors[i]) if self.ema_mirrors[i].ptr != NULL
                else self.ema_steps[i] for i in range(self.n)]

    def set_step(self, Py_ssize_t i, step, ema_step=0):
        if not (0 <= i < <Py_ssize_t>self.n):
            raise IndexError(i)
        if self.step_mirrors[i].ptr != NULL:
            raise TypeError("this block's step count lives in its step mirror")
        self.steps[i] = _check_count("step", step)
        if self.ema_mirrors[i].ptr == NULL:
            self.ema_steps[i] = _check_count("ema_step", ema_step)

    def set_options(self, Py_ssize_t group, double lr, double weight_decay, bint maximize,
                    ema_decay, hyper):
        """Set one group's options (already checked by the Python layer): lr, weight_decay,
        maximize, ema_decay (None: no average) and the rule's hyperparameters, in the
        order its header (csrc/rules/<rule>.h) lists them."""
        cdef Py_ssize_t k
        if not (0 <= group < <Py_ssize_t>self.ngroups):
            raise IndexError(group)
        if self.busy:
            raise RuntimeError("the options of a plan cannot change during its step")
        if len(hyper) > FA_MAX_HYPER:
            raise ValueError(f"at most {FA_MAX_HYPER} rule hyperparameters, got {len(hyper)}")
        cdef double h[FA_MAX_HYPER]
        for k in range(FA_MAX_HYPER):
            h[k] = float(hyper[k]) if k < len(hyper) else 0.0
        cdef double d = 0.0 if ema_decay is None else float(ema_decay)
        cdef fa_options *o = &self.options[group]
        o.lr = lr
        o.weight_decay = weight_decay
        o.maximize = maximize
        o.grad_scale = 1.0
        o.ema = ema_decay is not None
        o.ema_decay = d
        for k in range(FA_MAX_HYPER):
            o.hyper[k] = h[k]

    def current(self, groups):
        """True if `groups` (the NumPy API's param_groups) still holds exactly this plan's
        parameters, and every array the plan writes still has the data pointer, dtype,
        byte order, shape and flags it had at build."""
        return self._current(groups)

    cdef bint _current(self, object groups) except -1:
        cdef Py_ssize_t g, j, k = 0, ngroups
        cdef PyObject *group
        cdef PyObject *params
        cdef size_t i, w
        cdef int d
        cdef _Sig *s
        cdef cnp.ndarray a
        if type(groups) is not list:
            return False
        ngroups = PyList_GET_SIZE(groups)
        if ngroups != <Py_ssize_t>self.ngroups:
            return False
        for g in range(ngroups):
            group = PyList_GET_ITEM(groups, g)
            if type(<object>group) is not dict:
                return False
            params = PyDict_GetItem(<object>group, "params")
            if params == NULL or type(<object>params) is not list:
                return False
            if PyList_GET_SIZE(<object>params) != <Py_ssize_t>self.group_sizes[g]:
                return False
            for j in range(<Py_ssize_t>self.group_sizes[g]):
                if PyList_GET_ITEM(<object>params, j) != self.param_objs[k]:
                    return False
                k += 1
        for i in range(self.n):
            for w in range(<size_t>_W):
                s = &self.sigs[_W * i + w]
                if s.obj == NULL:
                    continue
                a = <cnp.ndarray>s.obj
                if (cnp.PyArray_DATA(a) != s.data or cnp.PyArray_TYPE(a) != s.typenum
                        or (cnp.PyArray_FLAGS(a) & _SIG_FLAGS) != _SIG_FLAGS
                        or not cnp.PyArray_ISNOTSWAPPED(a)):
                    return False
                if w >= <size_t>_SLOT_ABSMAX:  # 1-D, one float per 8-bit block
                    if (cnp.PyArray_NDIM(a) != 1 or <size_t>cnp.PyArray_DIMS(a)[0]
                            != (self.blocks[i].n + FA_Q8_BLOCK - 1) // FA_Q8_BLOCK):
                        return False
                    continue
                if cnp.PyArray_NDIM(a) != self.ndims[i]:
                    return False
                for d in range(self.ndims[i]):
                    if cnp.PyArray_DIMS(a)[d] != self.shapes[self.shape_at[i] + d]:
                        return False
        return True

    cdef double _next_step(self, size_t i) except -1:
        """The step t block i is about to take."""
        cdef const _Mirror *m = &self.step_mirrors[i]
        cdef double before
        if m.ptr != NULL:
            before = _mirror_get(m)
            if not (before >= 0.0):
                raise ValueError(f"state['step'] of {self._name('param', i)} must be "
                                 f">= 0, got {before}")
            if m.type == 2 and before >= <double>(_MAX_STEP - 1):
                raise ValueError(f"state['step'] of {self._name('param', i)} must be "
                                 f"< 2**62 - 1, got {before}")
            return _mirror_next(m)
        if self.steps[i] >= _MAX_STEP - 1:  # (step_count: checked once, in _acquire_grads)
            raise ValueError(f"{self._name('param', i)} has taken 2**62 - 1 "
                             f"steps, the most a step count may hold")
        return <double>(self.steps[i] + 1)

    cdef int _check_block(self, size_t i) except -1:
        """The streams block i's options need are there; its counts can grow."""
        cdef const fa_options *o = self.blocks[i].options
        cdef unsigned req = fa_rule_required(self.rule, o)
        cdef size_t k
        cdef const _Mirror *m
        for k in range(self.nstate):
            if (req >> k) & 1 and self.blocks[i].stream[FA_STATE0 + k] == NULL:
                raise ValueError(f"{self._name(self.names[1 + k], i)} is required by the "
                                 f"options of its parameter group, and is missing")
        if o.ema:
            if self.blocks[i].stream[FA_EMA] == NULL:
                raise ValueError(f"{self._name('param_ema', i)} is required when ema_decay "
                                 f"is set, and is missing")
            m = &self.ema_mirrors[i]
            if m.ptr != NULL:
                if not (0.0 <= _mirror_get(m) < <double>(_MAX_STEP - 1)):
                    raise ValueError(f"the param_ema count of {self._name('param', i)} must "
                                     f"be >= 0 and < 2**62 - 1, got {_mirror_get(m)}")
            elif self.ema_steps[i] >= _MAX_STEP - 1:
                raise ValueError(f"the param_ema of {self._name('param', i)} has taken "
                                 f"2**62 - 1 steps, the most a count may hold")
        return 0

    cdef size_t _acquire_grads(self, tuple grads) except? 0:
        """Acquire and check every non-None grad into grad_views/active; on error none is
        held. Returns the number of active blocks."""
        cdef Py_ssize_t i, lo, hi, mid
        cdef size_t nactive = 0
        cdef int gf
        cdef Py_buffer *v
        cdef uintptr_t gs, ge
        cdef fa_block *b
        cdef size_t gi
        if <size_t>len(grads) != self.n:
            raise ValueError(f"grads must have one entry per parameter ({self.n}), "
                             f"got {len(grads)}")
        if self._step_count >= _MAX_STEP - 1:
            raise ValueError("this optimizer has taken 2**62 - 1 steps, the most a step "
                             "count may hold")
        for gi in range(self.ngroups):  # the streams each group's options need
            self.required[gi] = fa_rule_required(self.rule, &self.options[gi]) | (
                _EMA_BIT if self.options[gi].ema else 0u)
        try:
            for i in range(<Py_ssize_t>self.n):
                g = grads[i]
                if g is None:
                    continue
                v = &self.grad_views[nactive]
                gf = self._acquire_grad(v, g, i)
                nactive += 1
                b = &self.active[nactive - 1]
                b[0] = self.blocks[i]
                b.stream[FA_GRAD] = v.buf
                b.format[FA_GRAD] = <unsigned char>gf
                self.active_index[nactive - 1] = i
                if self.step_mirrors[i].ptr == NULL and self.steps[i] < _MAX_STEP - 1:
                    b.step = <double>(self.steps[i] + 1)  # the common case, inline
                else:
                    b.step = self._next_step(i)
                if self.scalars[i].ptr != NULL:
                    b.scalar = _mirror_get(&self.scalars[i])
                gi = <size_t>(self.blocks[i].options - self.options)
                if (self.required[gi] & ~self.present[i]) or self.options[gi].ema:
                    self._check_block(i)
                if v.len == 0:
                    continue
                # Binary search: the last written interval starting below the grad's end.
                gs = <uintptr_t>v.buf
                ge = gs + <uintptr_t>v.len
                lo = 0
                hi = <Py_ssize_t>self.nintervals
                while lo < hi:
                    mid = (lo + hi) // 2
                    if self.intervals[mid].start < ge:
                        lo = mid + 1
                    else:
                        hi = mid
                if lo > 0 and self.intervals[lo - 1].end > gs:
                    raise ValueError(f"{self._name('grad', i)} shares memory with "
                                     f"{self._interval_label(lo - 1)}, which the step writes")
        except BaseException:
            self._release_grads(nactive)
            raise
        self.run.nactive = nactive
        return nactive

    cdef int _acquire_grad(self, Py_buffer *v, object g, Py_ssize_t i) except -1:
        """Acquire block i's grad; returns its format (FA_FMT_NATIVE: the plan's dtype)."""
        cdef int code
        # Fast path first: the label is formatted only when a check fails.
        if cnp.PyArray_CheckExact(g):
            code = _fill_from_ndarray(v, <cnp.ndarray>g)
            if code == self.dtype and _same_shape(v, self.ndims[i], &self.shapes[self.shape_at[i]]):
                return FA_FMT_NATIVE
        if self.grad16[i] and cnp.PyArray_Check(g) and (
                cnp.PyArray_TYPE(<cnp.ndarray>g) == self.param_typenum[i]):
            _acquire_stored(v, g, self._name("grad", i), False, self.grad16[i], self.ndims[i],
                            &self.shapes[self.shape_at[i]])
            return self.grad16[i]
        if self.grad16[i] and cnp.PyArray_Check(g) and (
                cnp.PyArray_TYPE(<cnp.ndarray>g) != cnp.NPY_FLOAT32):
            raise TypeError(f"{self._name('grad', i)} must have dtype float32 or its "
                            f"parameter's dtype {(<object>self.param_objs[i]).dtype}; got "
                            f"{_describe(g)}")
        _acquire(v, g, self._name("grad", i), False, self.dtype, self.ndims[i],
                 &self.shapes[self.shape_at[i]])
        return FA_FMT_NATIVE

    cdef void _release_grads(self, size_t nactive) noexcept:
        cdef size_t k
        for k in range(nactive):
            PyBuffer_Release(&self.grad_views[k])
        self.run.nactive = 0

    def step(self, grads, int num_threads=0, size_t chunk=0, int isa=-1,
             double grad_scale=1.0, bint skip_nonfinite=False, double max_grad_norm=0.0,
             int prefetch=-1, groups=None):
        """Take one step for every block whose grad is not None.

        grad_scale: every gradient is divided by it inside the pass (loss scaling).
        skip_nonfinite: first check the gradients; if any element is inf/NaN, change
        nothing (buffers and step counts) and return (False, norm).
        max_grad_norm > 0: clip the global L2 norm of the unscaled gradients to it, as
        torch.nn.utils.clip_grad_norm_ (coefficient max_norm/(norm + 1e-6), at most 1),
        folded into the update pass.
        groups: the NumPy API's param_groups; if they, or any array the plan writes, no
        longer match the plan (see current()), return None and change nothing.
        Returns (stepped, grad_norm): grad_norm is the unscaled global norm before
        clipping when it was computed (skip_nonfinite or clipping), else None.
        prefetch: -1 auto, 0 off, 1 on (fa_prefetch; for tests and measurements).
        Everything is checked before anything is written.
        """
        cdef tuple snap = _snapshot(grads)  # first: it may run a list subclass's code
        if groups is not None and not self._current(groups):
            return None
        cdef PyObject *plan = <PyObject *>self
        cdef PyObject *held = <PyObject *>snap  # the caller's frame keeps both alive
        return _step_plans(&plan, &held, 1, num_threads, chunk, isa, grad_scale,
                           skip_nonfinite, max_grad_norm, prefetch)


cdef int64_t _check_count(str name, object value) except -1:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = value.__index__()
    if not (0 <= value < MAX_STEP):
        raise ValueError(f"{name} must be >= 0 and < 2**62, got {value}")
    return <int64_t>value


cdef tuple _snapshot(object grads):
    # A tuple of the gradients holds a reference to each for the whole step, whatever
    # another thread does to the caller's list meanwhile.
    if type(grads) is tuple:
        return <tuple>grads
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list or tuple of arrays, got {type(grads).__name__}")
    return tuple(grads)


cdef enum:
    _MAX_PLANS = 8


def step_plans(plans, grads, int num_threads=0, double grad_scale=1.0,
               bint skip_nonfinite=False, double max_grad_norm=0.0):
    """One step over several plans (the torch API's dtypes) with ONE check of everything
    before any buffer moves: grads[k] is plan k's list. The global norm for clipping and
    skip_nonfinite is the sum over all plans. Returns as _Plan.step."""
    cdef tuple ps = tuple(plans)
    cdef list snaps = [_snapshot(g) for g in grads]  # held by this frame for the call
    cdef PyObject *pp[_MAX_PLANS]
    cdef PyObject *gp[_MAX_PLANS]
    cdef Py_ssize_t k, n = len(ps)
    if n != len(snaps) or not (1 <= n <= _MAX_PLANS):
        raise ValueError(f"one list of grads per plan, 1 to {_MAX_PLANS} plans")
    for k in range(n):
        if not isinstance(ps[k], _Plan):
            raise TypeError(f"plans[{k}] is not a _Plan")
        pp[k] = <PyObject *>ps[k]
        gp[k] = <PyObject *>snaps[k]
    return _step_plans(pp, gp, n, num_threads, 0, -1, grad_scale, skip_nonfinite,
                       max_grad_norm, -1)


cdef object _step_plans(PyObject **plans, PyObject **grads, Py_ssize_t nplans,
                        int num_threads, size_t chunk, int isa, double grad_scale,
                        bint skip_nonfinite, double max_grad_norm, int prefetch):
    # plans[k] and grads[k] (a tuple) are borrowed: the caller keeps them alive.
    cdef Py_ssize_t k, acquired = 0, busy = 0
    cdef _Run *runs[_MAX_PLANS]
    cdef _Plan plan
    cdef int nonfinite = 0, nf, nt
    cdef double sumsq = 0.0, norm = 0.0, coef = 1.0, scale = grad_scale
    cdef bint stats = skip_nonfinite or max_grad_norm > 0.0
    cdef bint stepped = False
    cdef size_t g, j, i
    cdef _Run *r
    cdef fa_block *b
    _check_isa(isa)
    nt = _threads(num_threads)
    if not (grad_scale > 0.0 and grad_scale < INFINITY):
        raise ValueError(f"grad_scale must be a finite number > 0, got {grad_scale}")
    if not (max_grad_norm >= 0.0 and max_grad_norm < INFINITY):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if prefetch < -1 or prefetch > 1:
        raise ValueError(f"prefetch must be -1 (auto), 0 or 1, got {prefetch}")
    try:
        for k in range(nplans):
            plan = <_Plan>plans[k]
            if plan.busy:
                raise RuntimeError("fastadam: a plan was stepped by two threads at once "
                                   "(the optimizers lock their steps; this is a bug)")
            plan.busy = True
            busy += 1
        for k in range(nplans):
            plan = <_Plan>plans[k]
            plan._acquire_grads(<tuple>grads[k])
            acquired += 1
            runs[k] = &plan.run
        with nogil:
            PyThread_acquire_lock(_step_lock, WAIT_LOCK)
            if stats:
                for k in range(nplans):
                    nf = 0
                    sumsq = sumsq + fa_grad_stats(<fa_dtype>runs[k].dtype, runs[k].active,
                                                  runs[k].nactive, runs[k].workspace, nt,
                                                  <fa_isa>isa, &nf)
                    nonfinite = nonfinite | nf
                norm = sqrt(sumsq) / grad_scale
                if nonfinite:
                    norm = sumsq  # inf or NaN, as torch reports it
                if max_grad_norm > 0.0:
                    coef = max_grad_norm / (norm + 1e-6)  # _options.clip_coefficient
                    if coef < 1.0:
                        scale = grad_scale / coef
            if not (skip_nonfinite and nonfinite):
                stepped = True
                for k in range(nplans):
                    r = runs[k]
                    for g in range(r.ngroups):
                        r.options[g].grad_scale = scale
                    fa_step(r.rule, <fa_dtype>r.dtype, r.active, r.nactive, nt, chunk,
                            <fa_isa>isa, prefetch)
                    # Commit the counts with the buffers, before anything else can run.
                    for j in range(r.nactive):
                        i = r.active_index[j]
                        b = &r.active[j]
                        if r.step_mirrors[i].ptr != NULL:
                            _mirror_set(&r.step_mirrors[i], b.step)
                        else:
                            r.steps[i] += 1
                        if b.options.ema:
                            if r.ema_mirrors[i].ptr != NULL:
                                _mirror_set(&r.ema_mirrors[i], _mirror_next(&r.ema_mirrors[i]))
                            else:
                                r.ema_steps[i] += 1
                        if r.scalars[i].ptr != NULL:
                            _mirror_set(&r.scalars[i], fa_scalar_after(r.rule, b.options,
                                                                       b.step, b.scalar))
                    r.step_count[0] += 1
            PyThread_release_lock(_step_lock)
    finally:
        for k in range(acquired):
            plan = <_Plan>plans[k]
            plan._release_grads(plan.run.nactive)
        for k in range(busy):
            (<_Plan>plans[k]).busy = False
    result = norm if stats else None
    for k in range(nplans):
        (<_Plan>plans[k]).last_grad_norm = result
    return stepped, result


def same_options(list keys, applied):
    """True if every option object in keys (one tuple per group) is the very object that
    was applied: the plan's options cannot have changed (the per-step fast path of
    _options.changed; anything else is compared there, values and types)."""
    cdef Py_ssize_t g, j, n = len(keys)
    if type(applied) is not list or len(<list>applied) != n:
        return False
    for g in range(n):
        k = keys[g]
        a = (<list>applied)[g]
        if k is a:
            continue
        if type(k) is not tuple or type(a) is not tuple or len(<tuple>k) != len(<tuple>a):
            return False
        for j in range(len(<tuple>k)):
            if PyTuple_GET_ITEM(k, j) != PyTuple_GET_ITEM(a, j):
                return False
    return True


def grad_stats(grads, int num_threads=0, int isa=-1, formats=None):
    """(sum of squares in double, any inf/NaN) over a list of float32 or float64 arrays,
    deterministic for every thread count and SIMD path (see fa_grad_stats). formats: None,
    or one FMT_* per grad: FMT_NATIVE for float32/float64 arrays (all of one dtype),
    FMT_BF16/FMT_F16 for 2-byte arrays holding bfloat16/float16."""
    cdef tuple snap = _snapshot(grads)
    cdef Py_ssize_t n = len(snap), i
    cdef Py_buffer *views
    cdef fa_block *blocks
    cdef double *ws = NULL
    cdef Py_ssize_t held = 0
    cdef int dtype = -1, nonfinite = 0, nt, code
    cdef size_t total = 0
    cdef double sumsq = 0.0
    _check_isa(isa)
    nt = _threads(num_threads)
    views = <Py_buffer *>calloc(n + 1, sizeof(Py_buffer))
    blocks = <fa_block *>calloc(n + 1, sizeof(fa_block))
    if views == NULL or blocks == NULL:
        free(views)
        free(blocks)
        raise MemoryError()
    try:
        if formats is not None and len(formats) != n:
            raise ValueError("formats must have one entry per grad")
        for i in range(n):
            g = snap[i]
            f = 0 if formats is None else formats[i]
            if f in (FA_FMT_BF16, FA_FMT_F16):
                _acquire_stored(&views[i], g, _label("grad", i, False), False, f, -1, NULL)
                held += 1
                blocks[i].format[FA_GRAD] = <unsigned char>f
                blocks[i].stream[FA_GRAD] = views[i].buf
                blocks[i].n = <size_t>(views[i].len // 2)
                total += blocks[i].n
                continue
            if f != 0:
                raise ValueError(f"formats[{i}] must be FMT_NATIVE, FMT_BF16 or FMT_F16, "
                                 f"got {f!r}")
            code = (_fill_from_ndarray(&views[i], <cnp.ndarray>g) if cnp.PyArray_CheckExact(g)
                    else -1)
            if code < 0 or (dtype >= 0 and code != dtype):
                code = _acquire(&views[i], g, _label("grad", i, False), False, dtype, -1, NULL)
            dtype = code
            held += 1
            blocks[i].stream[FA_GRAD] = views[i].buf
            blocks[i].n = <size_t>(views[i].len // views[i].itemsize)
            total += blocks[i].n
        ws = <double *>calloc(fa_grad_stats_workspace(total) + 1, sizeof(double))
        if ws == NULL:
            raise MemoryError()
        with nogil:
            sumsq = fa_grad_stats(<fa_dtype>(dtype if dtype >= 0 else 0), blocks, n, ws,
                                  nt, <fa_isa>isa, &nonfinite)
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views)
        free(blocks)
        free(ws)
    return sumsq, bool(nonfinite)


def rule_consts(int rule, double lr, double weight_decay, bint maximize, ema_decay, hyper,
                double step, double scalar=1.0, double grad_scale=1.0):
    """(constants, variant) the C core computes for one block (for tests against the
    reference): constants is the list of fa_consts.v, in the rule's order."""
    cdef fa_options o
    cdef fa_consts c
    cdef int k
    if not (0 <= rule < FA_RULE_COUNT):
        raise ValueError(f"rule must be in [0, {FA_RULE_COUNT})")
    o.lr = lr
    o.weight_decay = weight_decay
    o.maximize = maximize
    o.grad_scale = grad_scale
    o.ema = ema_decay is not None
    o.ema_decay = 0.0 if ema_decay is None else ema_decay
    for k in range(FA_MAX_HYPER):
        o.hyper[k] = float(hyper[k]) if k < len(hyper) else 0.0
    fa_consts_init(<fa_rule>rule, &c, &o, step, scalar)
    return [c.v[k] for k in range(FA_MAX_CONSTS)], c.variant


def scalar_after(int rule, double lr, double weight_decay, hyper, double step, double scalar):
    """The rule's per-block scalar after a step (fa_scalar_after; for tests)."""
    cdef fa_options o
    cdef int k
    if not (0 <= rule < FA_RULE_COUNT):
        raise ValueError(f"rule must be in [0, {FA_RULE_COUNT})")
    o.lr = lr
    o.weight_decay = weight_decay
    o.maximize = 0
    o.grad_scale = 1.0
    o.ema = 0
    o.ema_decay = 0.0
    for k in range(FA_MAX_HYPER):
        o.hyper[k] = float(hyper[k]) if k < len(hyper) else 0.0
    return fa_scalar_after(<fa_rule>rule, &o, step, scalar)


def traffic_f32(streams, int num_threads=0):
    """A rule's memory pattern without arithmetic (roofline probe): streams is a list of
    2 to 6 float32 arrays of one length -- param, grad (read only), then the state
    streams -- each read once and all but grad written once."""
    cdef float[::1] mv
    cdef float *ptrs[6]
    cdef Py_ssize_t k, ns = len(streams)
    cdef size_t n = 0
    cdef int nt = _threads(num_threads)
    cdef list held = []  # the memoryviews keep the buffers for the call
    if not (2 <= ns <= 6):
        raise ValueError("traffic_f32: 2 to 6 streams")
    for k in range(ns):
        mv = streams[k]
        held.append(mv)
        if k == 0:
            n = mv.shape[0]
        elif <size_t>mv.shape[0] != n:
            raise ValueError("traffic_f32: all streams must have the same length")
        if n > 0:
            ptrs[k] = &mv[0]
    if n == 0:
        return
    with nogil:
        fa_traffic_f32(ptrs, <int>ns, n, nt)


def traffic(arrays, int num_threads=0):
    """The memory pattern of a storage format without arithmetic (its roofline probe):
    arrays[1] (the grad) is read, every other array read and written, element by element
    -- 2 to 8 C-contiguous NumPy arrays with the same number of elements, of any element
    size (uint8 codes, 2-byte, float32, float64)."""
    cdef void *ptrs[8]
    cdef size_t es[8]
    cdef Py_ssize_t k, ns = len(arrays)
    cdef size_t n = 0
    cdef int nt = _threads(num_threads)
    cdef cnp.ndarray a
    held = tuple(arrays)
    if not (2 <= ns <= 8):
        raise ValueError("traffic: 2 to 8 arrays")
    for k in range(ns):
        if not cnp.PyArray_Check(held[k]):
            raise TypeError(f"arrays[{k}] must be a NumPy array")
        a = <cnp.ndarray>held[k]
        if not cnp.PyArray_IS_C_CONTIGUOUS(a) or (k != 1 and not cnp.PyArray_ISWRITEABLE(a)):
            raise ValueError(f"arrays[{k}] must be C-contiguous (and writable but for arrays[1])")
        if k == 0:
            n = <size_t>cnp.PyArray_SIZE(a)
        elif <size_t>cnp.PyArray_SIZE(a) != n:
            raise ValueError("traffic: all arrays must have the same number of elements")
        ptrs[k] = cnp.PyArray_DATA(a)
        es[k] = <size_t>cnp.PyArray_ITEMSIZE(a)
    if n == 0:
        return
    with nogil:
        fa_traffic(ptrs, es, <int>ns, n, nt)


def rng_base(seed, index):
    """fa_rng_base: a block's part of the stochastic-rounding key (for tests)."""
    return fa_rng_base(<uint64_t>seed, <uint64_t>index)


def stream_key(base, step, unsigned stream):
    """fa_stream_key (for tests against fastadam.reference.formats.stream_key)."""
    return fa_stream_key(<uint64_t>base, <uint64_t>step, stream)
