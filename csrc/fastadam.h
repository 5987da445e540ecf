/* fastadam.h -- the whole public C API of the fastadam core.
 *
 * An engine that runs elementwise optimizer update rules. A step updates, in place,
 * blocks of contiguous streams -- a parameter, its gradient (read only), the rule's
 * state buffers and optionally an average of the parameter -- in ONE fused pass per
 * element: every stream read once and written once, no temporaries, no allocation. The
 * order of floating-point operations of each rule is fixed (csrc/rules/<rule>.h and
 * fastadam/reference/<rule>.py), so every instruction-set path and thread count
 * produces the same bits.
 *
 * The engine (engine.c) knows blocks, streams, threads, dispatch and gradient
 * statistics, and no rule's state. A rule (csrc/rules/<rule>.h) knows its
 * hyperparameters, its per-step constants and its element update.
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

#define FA_VERSION "0.2.0"

/* The element type a call computes in, and the storage of its FA_FMT_NATIVE streams. */
typedef enum fa_dtype { FA_FLOAT32 = 0, FA_FLOAT64 = 1 } fa_dtype;

/* Storage of one stream of a block (fa_block.format). Anything but FA_FMT_NATIVE exists
 * only in FA_FLOAT32 calls: such a stream is loaded and widened exactly to float32, the
 * rule runs in float32, and a written stream is stored back -- rounded to 16 bits
 * (nearest-even, or stochastic: fa_block.stochastic) or re-quantized to 8 bits. The
 * grad may be FA_FMT_BF16 or FA_FMT_F16; the param and the state streams any format
 * (8-bit: state only). fastadam/reference/formats.py is the exact specification. */
typedef enum fa_format {
    FA_FMT_NATIVE = 0,      /* the call's dtype */
    FA_FMT_BF16 = 1,        /* bfloat16 bits (uint16) */
    FA_FMT_F16 = 2,         /* IEEE binary16 */
    FA_FMT_Q8_SIGNED = 3,   /* uint8 codes of bitsandbytes' signed dynamic map, blockwise */
    FA_FMT_Q8_UNSIGNED = 4, /* the unsigned map (streams that are never negative) */
    FA_FMT_COUNT = 5
} fa_format;

/* Elements per 8-bit block: each has one float32 absmax (fa_block.absmax). */
#define FA_Q8_BLOCK ((size_t)256)

/* Stochastic rounding draws 32 bits per stored element from a counter-based hash keyed
 * on (seed, parameter index, step, stream, element index), so the bits do not depend on
 * threads or SIMD path. fa_rng_base(seed, index) is a block's part of the key
 * (fa_block.rng_base); fa_stream_key(base, step, stream) the key of one stream of it at
 * step t (stream: FA_PARAM for the parameter, FA_STATE0 + k for state stream k). */
uint64_t fa_rng_base(uint64_t seed, uint64_t index);
uint64_t fa_stream_key(uint64_t base, uint64_t step, unsigned stream);

/* Instruction-set paths. FA_ISA_AUTO means "the one chosen by fa_init()". */
typedef enum fa_isa {
    FA_ISA_AUTO = -1,
    FA_ISA_SCALAR = 0, /* the plain C loop with auto-vectorisation disabled */
    FA_ISA_SSE2 = 1,   /* x86-64 baseline */
    FA_ISA_AVX2 = 2,   /* AVX2 + FMA (FMA is never used: no contraction) */
    FA_ISA_AVX512 = 3, /* AVX-512 F, BW and VL */
    FA_ISA_NEON = 4,   /* aarch64 baseline */
    FA_ISA_COUNT = 5
} fa_isa;

/* The update rules. Each one's hyperparameters (fa_options.hyper), state streams and
 * per-element operations are documented in csrc/rules/<name>.h. */
typedef enum fa_rule {
    FA_RULE_ADAM = 0,    /* Adam, AdamW, AMSGrad      (Kingma & Ba 2015)      */
    FA_RULE_SGD = 1,     /* SGD, momentum, Nesterov   (Sutskever et al. 2013) */
    FA_RULE_ADAGRAD = 2, /* AdaGrad                   (Duchi et al. 2011)     */
    FA_RULE_RMSPROP = 3, /* RMSprop                   (Tieleman & Hinton 2012) */
    FA_RULE_ADAMAX = 4,  /* AdaMax                    (Kingma & Ba 2015, Alg. 2) */
    FA_RULE_NADAM = 5,   /* NAdam                     (Dozat 2016)            */
    FA_RULE_RADAM = 6,   /* RAdam                     (Liu et al. 2020)       */
    FA_RULE_LION = 7,    /* Lion                      (Chen et al. 2023)      */
    FA_RULE_COUNT = 8
} fa_rule;

#define FA_MAX_HYPER  8  /* rule hyperparameters per group */
#define FA_MAX_STATE  3  /* state streams per block */
#define FA_MAX_CONSTS 16 /* per-step constants */

/* Stream slots of a block: param, grad, up to FA_MAX_STATE state buffers, the average. */
enum {
    FA_PARAM = 0,
    FA_GRAD = 1,
    FA_STATE0 = 2,                     /* the rule's state streams, in its order */
    FA_EMA = FA_STATE0 + FA_MAX_STATE, /* param_ema: the temporal average (optional) */
    FA_MAX_STREAMS = FA_EMA + 1
};

/* Hyperparameters of one parameter group. lr, weight_decay and maximize mean what they
 * mean in torch.optim for every rule; hyper[] holds the rule's own, in the order its
 * header lists (flags as 0.0 / 1.0). */
typedef struct fa_options {
    double lr;
    double weight_decay;
    double grad_scale; /* gradients are multiplied by 1/grad_scale in the pass; 1 = none */
    double ema_decay;  /* with ema: param_ema <- d*param_ema + (1-d)*param, d in [0, 1) */
    int maximize;      /* ascend: the gradient's sign is flipped */
    int ema;           /* update the FA_EMA stream (it must then be present) */
    double hyper[FA_MAX_HYPER];
} fa_options;

/* Per-step constants of one rule, derived from fa_options, the step t and the block's
 * scalar state in double precision, once per block run (never per element); each
 * kernel rounds them once to its element type. variant selects the kernel's branch-free
 * loop (bits defined by the engine and the rule). Exposed so that tests can compare them
 * with fastadam.reference. */
typedef struct fa_consts {
    double v[FA_MAX_CONSTS];
    unsigned variant;
} fa_consts;

/* Constants every rule's consts start with, and the engine's variant bit. */
enum { FA_C_GRAD_MUL = 0, FA_C_EMA_DECAY = 1, FA_C_ONE_MINUS_EMA_DECAY = 2, FA_C_RULE = 3 };
enum { FA_V_EMA = 1u << 1, FA_V_RULE_SHIFT = 2 };

/* Fill *c for rule at step t (>= 1; a double so that torch's float step counts are used
 * as torch uses them) from *o and the block's scalar state (see fa_rule_has_scalar).
 * Pure function. */
void fa_consts_init(fa_rule rule, fa_consts *c, const fa_options *o, double step, double scalar);

/* The rule's per-block scalar state after a step from `scalar` (NAdam's mu_product);
 * rules without one return scalar unchanged. */
double fa_scalar_after(fa_rule rule, const fa_options *o, double step, double scalar);
int fa_rule_has_scalar(fa_rule rule);
/* Bit k set: state stream FA_STATE0 + k must be present in a block with these options. */
unsigned fa_rule_required(fa_rule rule, const fa_options *o);
int fa_rule_nstate(fa_rule rule); /* state streams the rule may use */
const char *fa_rule_name(fa_rule rule);

/* One parameter tensor: n contiguous elements in each present stream (absent: NULL), in
 * the stream's format (zero: the call's dtype). No written stream may overlap another
 * stream of any block in the call (grads may overlap other grads). A zeroed fa_block
 * with streams, n, options and step set is a plain block of the call's dtype. */
typedef struct fa_block {
    void *stream[FA_MAX_STREAMS]; /* stream[FA_GRAD] is only read */
    size_t n;
    const fa_options *options;            /* blocks may share one fa_options */
    double step;                          /* t, the step being taken (>= 1) */
    double scalar;                        /* the rule's per-block scalar state before the step */
    unsigned char format[FA_MAX_STREAMS]; /* fa_format of each stream */
    float *absmax[FA_MAX_STREAMS];        /* 8-bit streams: ceil(n / FA_Q8_BLOCK) block maxima */
    /* Master weights: stream[FA_PARAM] is the float32 master, and image (format
     * image_format: FA_FMT_BF16 or FA_FMT_F16) is written as its rounded value. */
    void *image;
    unsigned char image_format;
    unsigned char stochastic; /* round 16-bit stores stochastically (else nearest-even) */
    uint64_t rng_base;        /* fa_rng_base(seed, the parameter's index) */
} fa_block;

/* Software prefetching in the update pass: of the next block's first cache lines,
 * before each block (engine.c), and within each block, 4 KiB ahead on every stream. */
typedef enum fa_prefetch {
    FA_PREFETCH_AUTO = -1, /* next blocks always; within blocks iff the step's state size
                              lies in fa_prefetch_window() */
    FA_PREFETCH_OFF = 0,   /* no prefetch instruction at all */
    FA_PREFETCH_ON = 1     /* both */
} fa_prefetch;

/* The window (lo, hi] of a step's state bytes -- all its elements x element size x the
 * streams of a block -- in which FA_PREFETCH_AUTO prefetches: (7/16 L3, L3], L3 being the
 * size of one L3 instance as CPUID reports it, read once by fa_init, on the CPUs where
 * prefetching was measured to pay (AMD Zen 3); (0, 0] (never) everywhere else. Such a
 * step runs from L3, where Zen 3's hardware prefetchers fall behind on its 4-5 streams;
 * a smaller one runs mostly from L2 and a larger one from DRAM, where they keep up and
 * software prefetches only cost instructions. The bounds are measurements of Adam on
 * Zen 3 (L3 32 MiB, 2 threads): 16 MB of state ran 1.05-1.3x faster with prefetching,
 * 12.8 MB between 0.94x and 1.03x, 9.6 MB and less, and 64 MB and more, 0.9-0.97x. On
 * Zen 4 (L3 32 MiB) 16-32 MB ran 5-18% slower with it. */
void fa_prefetch_window(size_t *lo, size_t *hi);

/* Default least number of elements worth a thread (see fa_step). */
#define FA_DEFAULT_CHUNK ((size_t)16384)

/* Update every block in place with `rule`: one OpenMP parallel region over the
 * concatenation of all blocks, split into equal contiguous shares (cut where a block's
 * own index is a multiple of FA_Q8_BLOCK, so no 8-bit block is shared), one per thread, so work is balanced by element count whatever the block
 * sizes. A thread is used only for each `chunk` elements of work (0 means
 * FA_DEFAULT_CHUNK): less than 2*chunk elements run on the calling thread. num_threads
 * <= 0 means OpenMP's default; the team never exceeds fa_thread_cap() (so that a
 * careless num_threads cannot make OpenMP create thousands of threads, which aborts the
 * process when the OS refuses). isa selects a path (FA_ISA_AUTO: the chosen one); it
 * must be compiled in and supported (see fa_isa_usable), which the caller checks.
 * prefetch is an fa_prefetch (FA_PREFETCH_AUTO unless measuring). The result does not
 * depend on num_threads, chunk, isa or prefetch. The blocks' scalar states are not
 * updated here: the caller commits fa_scalar_after() with its step counts. */
void fa_step(fa_rule rule, fa_dtype dtype, const fa_block *blocks, size_t nblocks, int num_threads,
             size_t chunk, fa_isa isa, int prefetch);

/* Gradient statistics for loss scaling and global-norm clipping, in one read pass.
 * Returns the sum of the squares of every grad element of every block (in double;
 * float32 and 16-bit elements (format[FA_GRAD]) are widened exactly), and sets *nonfinite to 1 if any element is
 * inf or NaN, else 0. The sum is deterministic: the concatenation of the blocks is cut
 * into fixed chunks of FA_NORM_CHUNK elements, each chunk summed with 16 interleaved
 * accumulators in a fixed order, then the chunk sums added in chunk order -- the same
 * bits for every thread count and SIMD path. workspace must hold
 * fa_grad_stats_workspace(total elements) doubles (caller-owned, no allocation here).
 * Only the grad streams and n of the blocks are read. */
#define FA_NORM_CHUNK ((size_t)16384)
size_t fa_grad_stats_workspace(size_t total_elements);
double fa_grad_stats(fa_dtype dtype, const fa_block *blocks, size_t nblocks, double *workspace,
                     int num_threads, fa_isa isa, int *nonfinite);

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

/* A rule's memory-traffic pattern without its arithmetic, for measuring the roofline a
 * real step is compared against: stream[0] (param) and stream[2..nstreams) are read and
 * written, stream[1] (grad) only read; float32, n elements each, 2 <= nstreams <= 6
 * (Adam: 4 streams, 28 bytes per element). Same threading as fa_step. */
void fa_traffic_f32(float *const *streams, int nstreams, size_t n, int num_threads);
/* The same for streams of any element size (esize[k] bytes: 1, 2, 4 or 8), as a storage
 * format moves them: streams[1] only read, every other one read and written, element by
 * element, tile by tile across all streams at once. */
void fa_traffic(void *const *streams, const size_t *esize, int nstreams, size_t n, int num_threads);

#ifdef __cplusplus
}
#endif
#endif /* FASTADAM_H */
