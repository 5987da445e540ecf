/* divider_bound.c -- how fast can one core take the square root and the quotient that
 * every Adam element needs, with nothing else to do?
 *
 * fastadam's kernel must give the reference's exact bits, so per element it takes one
 * correctly rounded sqrt and one correctly rounded division. On x86 both run on the same
 * divide/square-root unit, which bounds the kernel in cache. This loop over L1-resident
 * arrays does only q = a / (sqrt(b) * c + eps) (the kernel's denominator and quotient),
 * and, for comparison, the sqrt alone and the division alone.
 *
 *   cc -O3 -ffp-contract=off -fno-math-errno -mavx512f bench/divider_bound.c -o /tmp/db && /tmp/db
 *   (-mavx2 -mfma for AVX2, nothing for SSE2)
 *
 * Compare its first line with fastadam's elements/s at 1e5 in `python -m fastadam bench`.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N 4096 /* 3 arrays x 16 KiB: L1 */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

__attribute__((noinline)) static void sqrt_div(float *restrict q, const float *restrict a,
                                               const float *restrict b, size_t n)
{
    for (size_t i = 0; i < n; i++) q[i] = a[i] / (sqrtf(b[i]) * 0.7f + 1e-8f);
}

__attribute__((noinline)) static void sqrt_only(float *restrict q, const float *restrict a,
                                                const float *restrict b, size_t n)
{
    for (size_t i = 0; i < n; i++) q[i] = a[i] * (sqrtf(b[i]) * 0.7f + 1e-8f);
}

__attribute__((noinline)) static void div_only(float *restrict q, const float *restrict a,
                                               const float *restrict b, size_t n)
{
    for (size_t i = 0; i < n; i++) q[i] = a[i] / (b[i] * 0.7f + 1e-8f);
}

int main(void)
{
    float *q = aligned_alloc(64, N * sizeof(float)), *a = aligned_alloc(64, N * sizeof(float));
    float *b = aligned_alloc(64, N * sizeof(float));
    for (size_t i = 0; i < N; i++) {
        a[i] = 1.0f + 0.001f * (float)i;
        b[i] = 1.0f + 0.5f * (float)i;
    }
    void (*const fns[3])(float *, const float *, const float *, size_t) = {sqrt_div, sqrt_only,
                                                                           div_only};
    const char *const names[3] = {"sqrt + division", "sqrt only", "division only"};
    float sink = 0.0f;
    for (int k = 0; k < 3; k++) {
        double best = 1e30; /* best of 30 batches: the bound, not the typical speed */
        for (int r = 0; r < 30; r++) {
            const double t = now();
            for (int j = 0; j < 200; j++) fns[k](q, a, b, N);
            const double dt = now() - t;
            if (dt < best) best = dt;
            sink += q[r];
        }
        printf("%-16s %.3g float32 elements/s on one core\n", names[k], 200.0 * N / best);
    }
    return sink == 12345.0f; /* keeps the results live */
}
