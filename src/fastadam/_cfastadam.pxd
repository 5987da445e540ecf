# Declarations of the C core (csrc/fastadam.h) for Cython.
from libc.stdint cimport int64_t, uint64_t

cdef extern from "fastadam.h" nogil:
    const char *FA_VERSION
    ctypedef enum fa_dtype:
        FA_FLOAT32
        FA_FLOAT64
    ctypedef enum fa_isa:
        FA_ISA_AUTO
        FA_ISA_SCALAR
        FA_ISA_SSE2
        FA_ISA_AVX2
        FA_ISA_AVX512
        FA_ISA_NEON
        FA_ISA_COUNT
    ctypedef enum fa_rule:
        FA_RULE_ADAM
        FA_RULE_COUNT
    enum:
        FA_MAX_HYPER
        FA_MAX_STATE
        FA_MAX_CONSTS
        FA_PARAM
        FA_GRAD
        FA_STATE0
        FA_EMA
        FA_MAX_STREAMS
    ctypedef struct fa_options:
        double lr, weight_decay, grad_scale, ema_decay
        int maximize, ema
        double hyper[FA_MAX_HYPER]
    ctypedef struct fa_consts:
        double v[FA_MAX_CONSTS]
        unsigned variant
    ctypedef enum fa_format:
        FA_FMT_NATIVE
        FA_FMT_BF16
        FA_FMT_F16
        FA_FMT_Q8_SIGNED
        FA_FMT_Q8_UNSIGNED
        FA_FMT_COUNT
    size_t FA_Q8_BLOCK
    ctypedef struct fa_block:
        void *stream[FA_MAX_STREAMS]
        size_t n
        const fa_options *options
        double step
        double scalar
        unsigned char format[FA_MAX_STREAMS]
        float *absmax[FA_MAX_STREAMS]
        void *image
        unsigned char image_format
        unsigned char stochastic
        uint64_t rng_base
    uint64_t fa_rng_base(uint64_t seed, uint64_t index)
    uint64_t fa_stream_key(uint64_t base, uint64_t step, unsigned stream)
    void fa_traffic(void *const *streams, const size_t *esize, int nstreams, size_t n,
                    int num_threads)
    size_t FA_DEFAULT_CHUNK
    void fa_consts_init(fa_rule rule, fa_consts *c, const fa_options *o, double step,
                        double scalar)
    double fa_scalar_after(fa_rule rule, const fa_options *o, double step, double scalar)
    int fa_rule_has_scalar(fa_rule rule)
    unsigned fa_rule_required(fa_rule rule, const fa_options *o)
    int fa_rule_nstate(fa_rule rule)
    const char *fa_rule_name(fa_rule rule)
    void fa_step(fa_rule rule, fa_dtype dtype, const fa_block *blocks, size_t nblocks,
                 int num_threads, size_t chunk, fa_isa isa, int prefetch)
    void fa_prefetch_window(size_t *lo, size_t *hi)
    int fa_init(fa_isa force)
    fa_isa fa_isa_current()
    int fa_isa_compiled(fa_isa isa)
    int fa_isa_supported(fa_isa isa)
    int fa_isa_usable(fa_isa isa)
    const char *fa_isa_name(fa_isa isa)
    int fa_openmp()
    int fa_max_threads()
    int fa_thread_cap()
    size_t FA_NORM_CHUNK
    size_t fa_grad_stats_workspace(size_t total_elements)
    double fa_grad_stats(fa_dtype dtype, const fa_block *blocks, size_t nblocks,
                         double *workspace, int num_threads, fa_isa isa, int *nonfinite)
    void fa_traffic_f32(float *const *streams, int nstreams, size_t n, int num_threads)

cdef extern from "dispatch.h" nogil:
    int fa_q8_init()
