# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Thin binding of the fastadam C core (csrc/fastadam.h).

Design: this module only checks, converts and calls. It acquires every buffer
through the buffer protocol, checks dtype, shape, contiguity, writability and
aliasing *before* any buffer is written, fills plain C structs, releases the GIL
and makes ONE call into C per step over all parameter blocks. The arithmetic
lives in csrc/adam_kernel.h; the user-facing API and the reference live in
plain Python (optim.py, functional.py, reference.py).

A _Plan is built once per optimizer (params and optimizer state are fixed and
stay acquired for the plan's life, so numpy cannot resize them underneath);
per step only the gradients are acquired and checked: dtype, shape,
contiguity, and, by a binary search over the sorted output intervals, that no
gradient overlaps a buffer the step writes.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_RECORDS_RO,
                             PyBuffer_IsContiguous)
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport calloc, free, qsort
from libc.math cimport sqrt

from fastadam._cfastadam cimport *
cimport numpy as cnp

cnp.import_array()

import sys

VERSION = FA_VERSION.decode()
DEFAULT_CHUNK = FA_DEFAULT_CHUNK
ISA_NAMES = tuple(fa_isa_name(<fa_isa>i).decode() for i in range(FA_ISA_COUNT))

cdef bint _LITTLE = sys.byteorder == "little"
cdef const char *_OUT_NAMES[4]
_OUT_NAMES[0] = b"param"
_OUT_NAMES[1] = b"exp_avg"
_OUT_NAMES[2] = b"exp_avg_sq"
_OUT_NAMES[3] = b"max_exp_avg_sq"
_PLURAL = {"param": "params", "grad": "grads", "exp_avg": "exp_avgs",
           "exp_avg_sq": "exp_avg_sqs", "max_exp_avg_sq": "max_exp_avg_sqs"}
_DTYPE_NAMES = ("float32", "float64")
_OUT_BASES = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


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


def prefetch_window():
    """(lo, hi): a step prefetches in software when its state bytes lie in (lo, hi] (fastadam.h)."""
    cdef size_t lo = 0, hi = 0
    fa_prefetch_window(&lo, &hi)
    return lo, hi


# ------------------------------------------------------------------------ helpers
cdef str _describe(object obj):
    dt = getattr(obj, "dtype", None)
    if dt is not None:
        return f"{type(obj).__name__} of dtype {dt}"
    return type(obj).__name__

cdef str _label(str base, Py_ssize_t i, bint single):
    return base if single else f"{_PLURAL[base]}[{i}]"

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

cdef int _acquire(Py_buffer *view, object obj, str base, Py_ssize_t index, bint single,
                  bint writable, int dtype, const Py_buffer *like) except -1:
    """Acquire obj's buffer into *view and check it; on error nothing is held.

    The argument is named _label(base, index, single) in errors (formatted only then:
    this runs once per tensor per step). dtype: the required dtype code, or -1 for
    "float32 or float64". like: the buffer whose shape this one must have, or NULL.
    """
    cdef int code, k
    cdef bint same
    cdef str label
    if cnp.PyArray_CheckExact(obj):
        code = _fill_from_ndarray(view, <cnp.ndarray>obj)
        if code >= 0 and (dtype < 0 or code == dtype) and not (writable and view.readonly):
            same = like == NULL or view.ndim == like.ndim
            k = 0
            while same and like != NULL and k < view.ndim:
                same = view.shape[k] == like.shape[k]
                k += 1
            if same:
                return code
        # fall through: the general path below produces the error message
    if obj is None:
        label = _label(base, index, single)
        raise TypeError(f"{label} must be a float32 or float64 array, got None")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO)
    except Exception:
        label = _label(base, index, single)
        raise TypeError(f"{label} must support the buffer protocol (a NumPy array, say); "
                        f"got {_describe(obj)}") from None
    try:
        code = _dtype_code(view)
        label = None
        if code < 0 or (dtype >= 0 and code != dtype):
            label = _label(base, index, single)
            want = _DTYPE_NAMES[dtype] if dtype >= 0 else "float32 or float64"
            raise TypeError(f"{label} must have dtype {want} (all buffers of a step share "
                            f"one dtype); got {_describe(obj)} with format "
                            f"{(view.format or b'?').decode()!r}")
        if not PyBuffer_IsContiguous(view, b'C'):
            label = _label(base, index, single)
            raise ValueError(f"{label} must be C-contiguous; got a strided view "
                             f"(use numpy.ascontiguousarray and keep that array)")
        if writable and view.readonly:
            label = _label(base, index, single)
            raise ValueError(f"{label} is updated in place and must be writable; "
                             f"got a read-only buffer")
        if like != NULL:
            same = view.ndim == like.ndim
            k = 0
            while same and k < view.ndim:
                same = view.shape[k] == like.shape[k]
                k += 1
            if not same:
                label = _label(base, index, single)
                raise ValueError(f"{label} must have the shape of its parameter "
                                 f"{tuple(like.shape[k] for k in range(like.ndim))}; "
                                 f"got {tuple(view.shape[k] for k in range(view.ndim))}")
    except BaseException:
        PyBuffer_Release(view)
        raise
    return code


cdef int _fill_from_ndarray(Py_buffer *view, cnp.ndarray a) noexcept:
    """The fast path for exact numpy.ndarray (no buffer export: ~20 ns instead of ~150 ns
    per tensor per step). Fills the Py_buffer fields the checks and the call read and
    leaves view.obj as it is: NULL, since every view slot is zeroed at allocation and
    PyBuffer_Release resets it, so releasing this view is a no-op. The caller holds a reference to
    the array for as long as the pointer is used. Returns the dtype code, or -1 when the
    array is not a C-contiguous, native-order float32/float64 array (the general path
    then reports what is wrong)."""
    cdef int t = cnp.PyArray_TYPE(a)
    cdef int code = 0 if t == cnp.NPY_FLOAT32 else (1 if t == cnp.NPY_FLOAT64 else -1)
    if code < 0 or not cnp.PyArray_ISNOTSWAPPED(a) or not cnp.PyArray_IS_C_CONTIGUOUS(a):
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
    int which  # index into _OUT_NAMES

cdef int _cmp_interval(const void *a, const void *b) noexcept nogil:
    cdef uintptr_t x = (<const _Interval *>a).start, y = (<const _Interval *>b).start
    return (x > y) - (x < y)


# -------------------------------------------------------------------------- plan
cdef class _Plan:
    """Many parameter blocks and their optimizer state, checked once.

    _Plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, groups, ngroups, single)
    groups[i] is the parameter group of block i; max_exp_avg_sqs[i] may be None.
    Each block remembers its step count (torch's state['step']).
    """
    cdef size_t n, ngroups, nintervals
    cdef int dtype
    cdef bint single
    cdef Py_buffer *out            # 4 per block
    cdef char *held                # which of out[] are acquired
    cdef Py_buffer *grad_views     # 1 per block, held only during step()
    cdef fa_block *blocks
    cdef fa_block *active
    cdef fa_options *options
    cdef _Interval *intervals
    cdef double *workspace         # per-chunk sums for fa_grad_stats
    cdef readonly tuple arrays     # keeps every state object alive

    def __cinit__(self, list params, list exp_avgs, list exp_avg_sqs, list max_exp_avg_sqs,
                  list groups, Py_ssize_t ngroups, bint single=False):
        cdef Py_ssize_t n = len(params), i, j
        cdef Py_buffer *v
        cdef int which
        self.n = n
        self.single = single
        self.dtype = -1
        if not (len(exp_avgs) == len(exp_avg_sqs) == len(max_exp_avg_sqs) == len(groups) == n):
            raise ValueError("params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs and groups "
                             "must have one entry per parameter")
        if ngroups < 1:
            raise ValueError("ngroups must be >= 1")
        self.ngroups = ngroups
        self.out = <Py_buffer *>calloc(4 * n + 1, sizeof(Py_buffer))
        self.held = <char *>calloc(4 * n + 1, 1)
        self.grad_views = <Py_buffer *>calloc(n + 1, sizeof(Py_buffer))
        self.blocks = <fa_block *>calloc(n + 1, sizeof(fa_block))
        self.active = <fa_block *>calloc(n + 1, sizeof(fa_block))
        self.options = <fa_options *>calloc(ngroups, sizeof(fa_options))
        self.intervals = <_Interval *>calloc(4 * n + 1, sizeof(_Interval))
        cdef size_t total = 0
        if (self.out == NULL or self.held == NULL or self.grad_views == NULL or
                self.blocks == NULL or self.active == NULL or self.options == NULL or
                self.intervals == NULL):
            raise MemoryError()
        self.arrays = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        for j in range(ngroups):
            self.options[j].grad_scale = 1.0
        for i in range(n):
            g = groups[i]
            if not (0 <= g < ngroups):
                raise ValueError(f"groups[{i}] = {g} is not a group index")
            objs = (params[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i])
            for which in range(4):
                if which == 3 and objs[3] is None:
                    continue
                v = &self.out[4 * i + which]
                self.dtype = _acquire(v, objs[which], _OUT_BASES[which], i, single, True,
                                      self.dtype,
                                      NULL if which == 0 else &self.out[4 * i])
                self.held[4 * i + which] = 1
                if v.len > 0:
                    self.intervals[self.nintervals].start = <uintptr_t>v.buf
                    self.intervals[self.nintervals].end = <uintptr_t>v.buf + <uintptr_t>v.len
                    self.intervals[self.nintervals].block = i
                    self.intervals[self.nintervals].which = which
                    self.nintervals += 1
            self.blocks[i].param = self.out[4 * i].buf
            self.blocks[i].exp_avg = self.out[4 * i + 1].buf
            self.blocks[i].exp_avg_sq = self.out[4 * i + 2].buf
            self.blocks[i].max_exp_avg_sq = self.out[4 * i + 3].buf if self.held[4 * i + 3] else NULL
            self.blocks[i].n = <size_t>(self.out[4 * i].len // self.out[4 * i].itemsize)
            self.blocks[i].options = &self.options[g]
            self.blocks[i].step = 0
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

    cdef str _interval_label(self, size_t j):
        return _label(_OUT_NAMES[self.intervals[j].which].decode(),
                      self.intervals[j].block, self.single)

    def __dealloc__(self):
        cdef size_t i
        if self.held != NULL:
            for i in range(4 * self.n):
                if self.held[i]:
                    PyBuffer_Release(&self.out[i])
        free(self.out); free(self.held); free(self.grad_views); free(self.blocks)
        free(self.active); free(self.options); free(self.intervals); free(self.workspace)

    @property
    def dtype(self):
        return _DTYPE_NAMES[self.dtype] if self.dtype >= 0 else None

    def __len__(self):
        return self.n

    def get_steps(self):
        return [self.blocks[i].step for i in range(self.n)]

    def set_step(self, Py_ssize_t i, int64_t step):
        if not (0 <= i < <Py_ssize_t>self.n):
            raise IndexError(i)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.blocks[i].step = step

    def set_options(self, Py_ssize_t group, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bint decoupled_weight_decay, bint amsgrad,
                    bint maximize, bint bias_correction, int eps_mode, double grad_scale=1.0):
        # grad_scale is accepted (it is a field of _options.Options) but each step sets
        # its own: it belongs to the step, not to the group.
        """Set one group's hyperparameters (already checked by _options.py)."""
        if not (0 <= group < <Py_ssize_t>self.ngroups):
            raise IndexError(group)
        cdef fa_options *o = &self.options[group]
        o.lr = lr; o.beta1 = beta1; o.beta2 = beta2; o.eps = eps
        o.weight_decay = weight_decay; o.grad_scale = 1.0
        o.decoupled_weight_decay = decoupled_weight_decay; o.amsgrad = amsgrad
        o.maximize = maximize; o.bias_correction = bias_correction
        o.eps_mode = <fa_eps_mode>eps_mode

    cdef size_t _acquire_grads(self, grads) except? 0:
        """Acquire and check every non-None grad into grad_views/active; on error none is
        held. Returns the number of active blocks."""
        cdef Py_ssize_t i, lo, hi, mid
        cdef size_t nactive = 0
        cdef Py_buffer *v
        cdef uintptr_t gs, ge
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list or tuple of arrays, got {type(grads).__name__}")
        if <size_t>len(grads) != self.n:
            raise ValueError(f"grads must have one entry per parameter ({self.n}), "
                             f"got {len(grads)}")
        try:
            for i in range(<Py_ssize_t>self.n):
                g = grads[i]
                if g is None:
                    continue
                v = &self.grad_views[nactive]
                _acquire(v, g, "grad", i, self.single, False, self.dtype, &self.out[4 * i])
                nactive += 1
                self.active[nactive - 1] = self.blocks[i]
                self.active[nactive - 1].grad = v.buf
                self.active[nactive - 1].step = self.blocks[i].step + 1
                if self.blocks[i].options.amsgrad and self.blocks[i].max_exp_avg_sq == NULL:
                    raise ValueError(f"{_label('max_exp_avg_sq', i, self.single)} is required "
                                     f"when amsgrad=True")
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
                    raise ValueError(f"{_label('grad', i, self.single)} shares memory with "
                                     f"{self._interval_label(lo - 1)}, which the step writes")
        except BaseException:
            self._release_grads(nactive)
            raise
        return nactive

    cdef void _release_grads(self, size_t nactive) noexcept:
        cdef size_t k
        for k in range(nactive):
            PyBuffer_Release(&self.grad_views[k])

    def step(self, grads, int num_threads=0, size_t chunk=0, int isa=-1,
             double grad_scale=1.0, bint skip_nonfinite=False, double max_grad_norm=0.0,
             int prefetch=-1):
        """Take one step for every block whose grad is not None.

        grad_scale: every gradient is divided by it inside the pass (loss scaling).
        skip_nonfinite: first check the gradients; if any element is inf/NaN, change
        nothing (buffers and step counts) and return (False, norm).
        max_grad_norm > 0: clip the global L2 norm of the unscaled gradients to it, as
        torch.nn.utils.clip_grad_norm_ (coefficient max_norm/(norm + 1e-6), at most 1),
        folded into the update pass.
        Returns (stepped, grad_norm): grad_norm is the unscaled global norm before
        clipping when it was computed (skip_nonfinite or clipping), else None.
        prefetch: -1 auto, 0 off, 1 on (fa_prefetch; for tests and measurements).
        Everything is checked before anything is written.
        """
        cdef size_t nactive, g
        cdef int nonfinite = 0
        cdef double sumsq = 0.0, norm = 0.0, coef = 1.0, scale = grad_scale
        cdef bint stats = skip_nonfinite or max_grad_norm > 0.0
        if isa != -1 and not fa_isa_usable(<fa_isa>isa):
            raise ValueError(f"SIMD path {isa} is not usable on this machine")
        if num_threads < 0:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        if prefetch not in (-1, 0, 1):
            raise ValueError(f"prefetch must be -1 (auto), 0 or 1, got {prefetch}")
        nactive = self._acquire_grads(grads)
        try:
            with nogil:
                if stats:
                    sumsq = fa_grad_stats(<fa_dtype>self.dtype, self.active, nactive,
                                          self.workspace, num_threads, <fa_isa>isa, &nonfinite)
                    norm = sqrt(sumsq) / grad_scale
                    if nonfinite:
                        norm = sumsq  # inf or NaN, as torch reports it
                    if max_grad_norm > 0.0:
                        coef = max_grad_norm / (norm + 1e-6)  # _options.clip_coefficient
                        if coef < 1.0:
                            scale = grad_scale / coef
                if not (skip_nonfinite and nonfinite):
                    for g in range(self.ngroups):
                        self.options[g].grad_scale = scale
                    fa_adam_step(<fa_dtype>self.dtype, self.active, nactive, num_threads,
                                 chunk, <fa_isa>isa, prefetch)
        finally:
            self._release_grads(nactive)
        if skip_nonfinite and nonfinite:
            return False, norm
        for i in range(<Py_ssize_t>self.n):  # commit the step counts of the blocks that moved
            if grads[i] is not None:
                self.blocks[i].step += 1
        return True, (norm if stats else None)


def grad_stats(grads, int num_threads=0, int isa=-1):
    """(sum of squares in double, any inf/NaN) over a list of float32 or float64 arrays,
    deterministic for every thread count and SIMD path (see fa_grad_stats)."""
    cdef Py_ssize_t n = len(grads), i
    cdef Py_buffer *views = <Py_buffer *>calloc(n + 1, sizeof(Py_buffer))
    cdef fa_block *blocks = <fa_block *>calloc(n + 1, sizeof(fa_block))
    cdef double *ws = NULL
    cdef Py_ssize_t held = 0
    cdef int dtype = -1, nonfinite = 0
    cdef size_t total = 0
    cdef double sumsq = 0.0
    if views == NULL or blocks == NULL:
        free(views); free(blocks)
        raise MemoryError()
    try:
        if isa != -1 and not fa_isa_usable(<fa_isa>isa):
            raise ValueError(f"SIMD path {isa} is not usable on this machine")
        for i in range(n):
            dtype = _acquire(&views[i], grads[i], "grad", i, False, False, dtype, NULL)
            held += 1
            blocks[i].grad = views[i].buf
            blocks[i].n = <size_t>(views[i].len // views[i].itemsize)
            total += blocks[i].n
        ws = <double *>calloc(fa_grad_stats_workspace(total) + 1, sizeof(double))
        if ws == NULL:
            raise MemoryError()
        with nogil:
            sumsq = fa_grad_stats(<fa_dtype>(dtype if dtype >= 0 else 0), blocks, n, ws,
                                  num_threads, <fa_isa>isa, &nonfinite)
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views); free(blocks); free(ws)
    return sumsq, bool(nonfinite)


def step_consts(double lr, double beta1, double beta2, double eps, double weight_decay,
                bint decoupled_weight_decay, bint maximize, bint bias_correction,
                int eps_mode, int64_t step, double grad_scale=1.0):
    """The per-step constants the C core computes (for tests against the reference)."""
    cdef fa_options o
    cdef fa_step_consts c
    o.lr = lr; o.beta1 = beta1; o.beta2 = beta2; o.eps = eps; o.weight_decay = weight_decay
    o.grad_scale = grad_scale; o.decoupled_weight_decay = decoupled_weight_decay
    o.amsgrad = 0; o.maximize = maximize; o.bias_correction = bias_correction
    o.eps_mode = <fa_eps_mode>eps_mode
    fa_step_consts_init(&c, &o, step)
    return c


def traffic_f32(float[::1] param, const float[::1] grad, float[::1] exp_avg,
                float[::1] exp_avg_sq, int num_threads=0):
    """The Adam memory pattern without arithmetic (roofline probe)."""
    cdef size_t n = param.shape[0]
    if not (grad.shape[0] == exp_avg.shape[0] == exp_avg_sq.shape[0] == <Py_ssize_t>n):
        raise ValueError("traffic_f32: all four buffers must have the same length")
    if n == 0:
        return
    with nogil:
        fa_traffic_f32(&param[0], &grad[0], &exp_avg[0], &exp_avg_sq[0], n, num_threads)
