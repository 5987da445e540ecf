/* fastadam.h -- the whole public C API of the fastadam core.
 *
 * One fused pass per element updates, in place,
 *     param, exp_avg (m), exp_avg_sq (v) [and max_exp_avg_sq for AMSGrad]
 * from grad, with no temporaries and no allocation. The order of floating-point
 * operations is fixed (see adam_kernel.h and fastadam/reference.py) and every
 * instruction-set path and thread count produces the same bits.
 *
 * Conventions: every symbol has the prefix fa_ / FA_; lengths are size_t element
 * counts; the caller owns every buffer. Kernels validate nothing: callers
 * (the Python layer) check dtypes, sizes, aliasing and options once, before any
 * buffer is touched. The only global mutable state is the dispatch choice, set
 * once by fa_init().
 */
#ifndef FASTADAM_H
#define FASTADAM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FA_VERSION "0.1.0"

typedef enum fa_dtype { FA_FLOAT32 = 0, FA_FLOAT64 = 1 } fa_dtype;

/* Instruction-set paths. FA_ISA_AUTO means "the one chosen by fa_init()". */
typedef enum fa_isa {
    FA_ISA_AUTO = -1,
    FA_ISA_SCALAR = 0, /* the plain C loop with auto-vectorisation disabled */
    FA_ISA_SSE2 = 1,   /* x86-64 baseline */
    FA_ISA_AVX2 = 2,   /* AVX2 + FMA (FMA is never used: no contraction) */
    FA_ISA_AVX512 = 3, /* AVX-512F */
    FA_ISA_NEON = 4,   /* aarch64 baseline */
    FA_ISA_COUNT = 5
} fa_isa;

typedef enum fa_eps_mode {
    FA_EPS_PAPER = 0, /* p -= lr * m_hat / (sqrt(v_hat) + eps)            (torch, optax) */
    FA_EPS_HAT = 1    /* p -= lr*sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps) (Keras)     */
} fa_eps_mode;

/* Hyperparameters of one parameter group, as the user gives them. */
typedef struct fa_options {
    double lr;           /* alpha */
    double beta1, beta2; /* in [0, 1) */
    double eps;          /* epsilon (epsilon-hat in FA_EPS_HAT mode) */
    double weight_decay; /* lambda; L2 (added to the gradient) or decoupled */
    double grad_scale;   /* gradients are multiplied by 1/grad_scale in the pass; 1 = none */
    int decoupled_weight_decay; /* AdamW: p *= 1 - lr*lambda before the update */
    int amsgrad;         /* keep max of v in max_exp_avg_sq; needs that buffer */
    int maximize;        /* ascend: the gradient's sign is flipped */
    int bias_correction; /* divide by 1-beta^t (0: no correction) */
    fa_eps_mode eps_mode;
} fa_options;

/* Per-step constants derived from fa_options and the step t, in double; each
 * kernel rounds them once to its element type. Exposed so that the Python
 * reference and tests can see exactly what the kernel multiplies by. */
typedef struct fa_step_consts {
    double grad_mul;          /* (maximize ? -1 : 1) / grad_scale */
    double l2_weight_decay;   /* lambda if L2 weight decay is on, else 0 */
    double param_decay;       /* 1 - lr*lambda if decoupled, else exactly 1 */
    double one_minus_beta1;   /* 1 - beta1 */
    double beta2;
    double one_minus_beta2;   /* 1 - beta2 */
    double inv_sqrt_bias_correction2; /* 1/sqrt(1-beta2^t) (paper mode), else 1 */
    double eps;
    double step_size;         /* lr/(1-beta1^t) (paper) or lr*sqrt(1-beta2^t)/(1-beta1^t) (hat) */
    int l2;                   /* L2 weight decay term present */
    int amsgrad;
} fa_step_consts;

/* Fill *c for step t from *o (both caller-owned). Pure function. t is a double so that
 * the torch API can pass torch's float step counts as torch uses them (any value >= 1,
 * fractional or huge); the NumPy API passes whole numbers t >= 1. */
void fa_step_consts_init(fa_step_consts *c, const fa_options *o, double step);

/* One parameter tensor. All pointers point at n contiguous elements of the
 * call's dtype; none may overlap another buffer of any block in the call
 * (grads may overlap other grads). max_exp_avg_sq is read only when
 * options->amsgrad, and may be NULL otherwise. */
typedef struct fa_block {
    void *param;
    const void *grad;
    void *exp_avg;
    void *exp_avg_sq;
    void *max_exp_avg_sq;
    size_t n;
    const fa_options *options; /* blocks may share one fa_options */
    double step;               /* t, the step being taken (>= 1) */
} fa_block;

/* Software prefetching in the update pass (see fa_adam_step and adam_kernel.h): of the
 * next block's first cache lines, before each block (adam.c), and within each block,
 * 4 KiB ahead on every stream. */
typedef enum fa_prefetch {
    FA_PREFETCH_AUTO = -1, /* next blocks always; within blocks iff the step's state size
                              lies in fa_prefetch_window() */
    FA_PREFETCH_OFF = 0,   /* no prefetch instruction at all */
    FA_PREFETCH_ON = 1     /* both */
} fa_prefetch;

/* The window (lo, hi] of a step's state bytes -- all its elements x element size x 4
 * streams (param, grad, exp_avg, exp_avg_sq) -- in which FA_PREFETCH_AUTO prefetches:
 * (7/16 L3, L3], L3 being the size of one L3 instance as CPUID reports it, read once
 * by fa_init, on the CPUs where prefetching was measured to pay (AMD Zen 3); (0, 0]
 * (never) everywhere else. Such a step runs from L3, where Zen 3's hardware prefetchers
 * fall behind on its 4-5 streams; a smaller one runs mostly from L2 and a larger one
 * from DRAM, where they keep up and software prefetches only cost instructions. The
 * bounds are measurements on Zen 3 (L3 32 MiB, 2 threads): 16 MB of state ran 1.05-1.3x
 * faster with prefetching, 12.8 MB between 0.94x and 1.03x, 9.6 MB and less, and 64 MB
 * and more, 0.9-0.97x. On Zen 4 (L3 32 MiB) 16-32 MB ran 5-18% slower with it. */
void fa_prefetch_window(size_t *lo, size_t *hi);

/* Default least number of elements worth a thread (see fa_adam_step). */
#define FA_DEFAULT_CHUNK ((size_t)16384)

/* Update every block in place: one OpenMP parallel region over the
 * concatenation of all blocks, split into equal contiguous shares (cut on
 * multiples of 16 elements), one per thread, so work is balanced by element
 * count whatever the block sizes. A thread is used only for each `chunk`
 * elements of work (0 means FA_DEFAULT_CHUNK): less than 2*chunk elements run
 * on the calling thread. num_threads <= 0 means OpenMP's default; the team never
 * exceeds fa_thread_cap() (so that a careless num_threads cannot make OpenMP create
 * thousands of threads, which aborts the process when the OS refuses). isa selects a
 * path (FA_ISA_AUTO: the chosen one); it must be compiled in and supported
 * (see fa_isa_usable), which the caller checks. prefetch is an fa_prefetch
 * (FA_PREFETCH_AUTO unless measuring). The result does not depend on num_threads,
 * chunk, isa or prefetch. */
void fa_adam_step(fa_dtype dtype, const fa_block *blocks, size_t nblocks,
                  int num_threads, size_t chunk, fa_isa isa, int prefetch);

/* Gradient statistics for loss scaling and global-norm clipping, in one read pass.
 * Returns the sum of the squares of every grad element of every block (in double;
 * float32 elements are widened exactly), and sets *nonfinite to 1 if any element is
 * inf or NaN, else 0. The sum is deterministic: the concatenation of the blocks is cut
 * into fixed chunks of FA_NORM_CHUNK elements, each chunk summed with 16 interleaved
 * accumulators in a fixed order, then the chunk sums added in chunk order -- the same
 * bits for every thread count and SIMD path. workspace must hold
 * fa_grad_stats_workspace(total elements) doubles (caller-owned, no allocation here).
 * Only the grad and n fields of the blocks are read. */
#define FA_NORM_CHUNK ((size_t)16384)
size_t fa_grad_stats_workspace(size_t total_elements);
double fa_grad_stats(fa_dtype dtype, const fa_block *blocks, size_t nblocks,
                     double *workspace, int num_threads, fa_isa isa, int *nonfinite);

/* Dispatch. fa_init picks the best usable path, or `force` if it is usable
 * (force == FA_ISA_AUTO: best). Returns the chosen path, or -1 (nothing
 * changed) if `force` is not usable. Called once, at import. */
int fa_init(fa_isa force);
fa_isa fa_isa_current(void);
int fa_isa_compiled(fa_isa isa);  /* a kernel for it was built into this binary */
int fa_isa_supported(fa_isa isa); /* this CPU and OS can run it */
int fa_isa_usable(fa_isa isa);    /* both */
const char *fa_isa_name(fa_isa isa);

/* Threading. fa_openmp() is 1 when built with OpenMP, else 0 (everything then
 * runs serially on the calling thread). */
int fa_openmp(void);
int fa_max_threads(void);
/* The most threads any call uses: 4 x the processors OpenMP may run on (a memory-bound
 * pass gains nothing from more), at least OpenMP's default team. 1 without OpenMP. */
int fa_thread_cap(void);

/* The Adam memory-traffic pattern without the arithmetic (read p, g, m, v;
 * write p, m, v: 28 bytes per float32 element), for measuring the roofline a
 * real step is compared against. Same threading as fa_adam_step. */
void fa_traffic_f32(float *param, const float *grad, float *exp_avg,
                    float *exp_avg_sq, size_t n, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* FASTADAM_H */
