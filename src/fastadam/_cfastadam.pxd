# Declarations of the C core (csrc/fastadam.h) for Cython.
from libc.stdint cimport int64_t

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
    ctypedef enum fa_eps_mode:
        FA_EPS_PAPER
        FA_EPS_HAT
    ctypedef struct fa_options:
        double lr, beta1, beta2, eps, weight_decay, grad_scale
        int decoupled_weight_decay, amsgrad, maximize, bias_correction
        fa_eps_mode eps_mode
    ctypedef struct fa_step_consts:
        double grad_mul, l2_weight_decay, param_decay, one_minus_beta1, beta2
        double one_minus_beta2, inv_sqrt_bias_correction2, eps, step_size
        int l2, amsgrad
    ctypedef struct fa_block:
        void *param
        const void *grad
        void *exp_avg
        void *exp_avg_sq
        void *max_exp_avg_sq
        size_t n
        const fa_options *options
        double step
    size_t FA_DEFAULT_CHUNK
    void fa_step_consts_init(fa_step_consts *c, const fa_options *o, double step)
    void fa_adam_step(fa_dtype dtype, const fa_block *blocks, size_t nblocks,
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
    void fa_traffic_f32(float *param, const float *grad, float *exp_avg,
                        float *exp_avg_sq, size_t n, int num_threads)
