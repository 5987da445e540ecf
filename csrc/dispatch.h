/* dispatch.h -- private: the kernel table shared by engine.c, dispatch.c and kernel.h. */
#ifndef FASTADAM_DISPATCH_H
#define FASTADAM_DISPATCH_H
#include "fastadam.h"

/* One rule's kernel: n elements of every present stream of s (already offset to the
 * first element to update), with the constants of its block. prefetch: prefetch within
 * the block (see FA_LOOP). */
typedef struct fa_fused fa_fused;
typedef void (*fa_kernel_fn)(const fa_consts *c, char *const *s, size_t n, int prefetch,
                             const fa_fused *fx);

/* What a kernel over 16-bit storage needs besides its streams (NULL for the others): the
 * tensor-local index of the streams' first element, and each stream's random key halves
 * (stochastic rounding; the range never crosses a multiple of 2**32). */
struct fa_fused {
    size_t i0;
    uint32_t key[FA_MAX_STREAMS][2];
};

/* The kernels of a rule: [storage] */
enum { FA_K_F32 = 0, FA_K_F64 = 1, FA_K_BF16 = 2, FA_K_BF16_SR = 3, FA_K_COUNT = 4 };
typedef void (*fa_traffic_fn)(float *const *s, int nstreams, size_t n);
typedef void (*fa_sumsq_fn)(const void *x, size_t n, double *acc16, double *nonfinite);
/* Storage formats (formats.h): load elements [i0, i0 + n) of a stream into a float32 tile;
 * store a tile back (key: NULL for nearest rounding, else the stream key's two halves). */
typedef void (*fa_load_fn)(const void *src, size_t i0, size_t n, float *dst, const float *absmax);
typedef void (*fa_store_fn)(const float *src, void *dst, size_t i0, size_t n, float *absmax,
                            const uint32_t *key);
typedef void (*fa_traffic_any_fn)(char *const *s, const size_t *esize, int nstreams, size_t n,
                                  unsigned *sink);

/* sumsq indices: the grad's storage */
enum { FA_SUMSQ_F32 = 0, FA_SUMSQ_F64 = 1, FA_SUMSQ_BF16 = 2, FA_SUMSQ_F16 = 3 };

typedef struct fa_kernel_table {
    fa_kernel_fn rule[FA_RULE_COUNT][FA_K_COUNT]; /* [rule][FA_K_*] */
    fa_traffic_fn traffic;
    fa_sumsq_fn sumsq[4];          /* FA_SUMSQ_* */
    fa_load_fn load[FA_FMT_COUNT]; /* [FA_FMT_NATIVE] unused */
    fa_store_fn store[FA_FMT_COUNT];
    fa_traffic_any_fn traffic_any;
} fa_kernel_table;

/* 8-bit quantization tables (q8.c, filled once by fa_init, read-only afterwards): for the
 * bit pattern a of |q| (q = x / absmax, |q| <= 1), bucket = clamp(a >> 16, LO, HI) - LO;
 * entry t = (count << 16) | low: the number of thresholds below q is
 * (t >> 16) + ((a & 0xffff) > (t & 0xffff)). Three tables of FA_Q8_NBUCKETS, one after
 * the other: the signed map's positive thresholds; its negative ones (counting those with
 * |threshold| <= |q|); the unsigned map's. */
#define FA_Q8_BUCKET_LO 0x3380u /* 2**-24 >> 16: below every threshold's magnitude */
#define FA_Q8_BUCKET_HI 0x3f80u /* 1.0 >> 16 */
#define FA_Q8_NBUCKETS  (FA_Q8_BUCKET_HI - FA_Q8_BUCKET_LO + 1u)
extern uint32_t fa_q8_buckets[3 * FA_Q8_NBUCKETS];
extern uint32_t fa_q8_zero_index; /* the signed map's index of 0.0: its negative codes */
int fa_q8_init(void);             /* 0, or -1 if the maps break the tables' assumptions */

/* The table of `isa` (FA_ISA_AUTO: the chosen one). isa must be usable. */
const fa_kernel_table *fa_table(fa_isa isa);

/* Each rule's host side (rules.c): what engine.c needs to know of it. */
typedef struct fa_rule_host {
    const char *name;
    int nstate;     /* state streams it may use */
    int has_scalar; /* keeps a per-block scalar (fa_block.scalar) */
    void (*consts)(fa_consts *c, const fa_options *o, double step, double scalar);
    unsigned (*required)(const fa_options *o);
    double (*scalar_after)(const fa_options *o, double step, double scalar);
} fa_rule_host;

extern const fa_rule_host fa_rules[FA_RULE_COUNT];
#endif
