/* dispatch.h -- private: the kernel table shared by adam.c and dispatch.c. */
#ifndef FASTADAM_DISPATCH_H
#define FASTADAM_DISPATCH_H
#include "fastadam.h"

typedef void (*fa_kernel_fn)(const fa_step_consts *c, void *param, const void *grad,
                             void *exp_avg, void *exp_avg_sq, void *max_exp_avg_sq,
                             size_t n, int prefetch);
typedef void (*fa_traffic_fn)(float *p, const float *g, float *m, float *v, size_t n);

typedef void (*fa_sumsq_fn)(const void *x, size_t n, double *acc16, double *nonfinite);

typedef struct fa_kernel_table {
    fa_kernel_fn f32, f64;
    fa_traffic_fn traffic;
    fa_sumsq_fn sumsq_f32, sumsq_f64;
} fa_kernel_table;

/* The table of `isa` (FA_ISA_AUTO: the chosen one). isa must be usable. */
const fa_kernel_table *fa_table(fa_isa isa);
#endif
