/* dispatch.h -- private: the kernel table shared by engine.c, dispatch.c and kernel.h. */
#ifndef FASTADAM_DISPATCH_H
#define FASTADAM_DISPATCH_H
#include "fastadam.h"

/* One rule's kernel: n elements of every present stream of s (already offset to the
 * first element to update), with the constants of its block. prefetch: prefetch within
 * the block (see FA_LOOP). */
typedef void (*fa_kernel_fn)(const fa_consts *c, char *const *s, size_t n, int prefetch);
typedef void (*fa_traffic_fn)(float *const *s, int nstreams, size_t n);
typedef void (*fa_sumsq_fn)(const void *x, size_t n, double *acc16, double *nonfinite);

typedef struct fa_kernel_table {
    fa_kernel_fn rule[FA_RULE_COUNT][2]; /* [rule][dtype] */
    fa_traffic_fn traffic;
    fa_sumsq_fn sumsq[2]; /* [dtype] */
} fa_kernel_table;

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
