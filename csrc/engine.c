/* engine.c -- what every rule shares: one OpenMP region over all blocks, the per-block
 * constants, prefetching, the gradient statistics pass and the call through the kernel
 * table. It names no rule's state. Built with baseline flags only. */
#include "fastadam.h"
#include "dispatch.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const fa_options *options;
    double step, scalar;
    fa_consts consts;
} consts_cache;

static const fa_consts *consts_for(consts_cache *cache, fa_rule rule, const fa_block *b)
{
    /* Consecutive blocks of one group share options and step: compute once. */
    if (cache->options != b->options || cache->step != b->step || cache->scalar != b->scalar) {
        fa_consts_init(rule, &cache->consts, b->options, b->step, b->scalar);
        cache->options = b->options;
        cache->step = b->step;
        cache->scalar = b->scalar;
    }
    return &cache->consts;
}

/* Cache lines of each stream of the next block to prefetch before a block is updated.
 * A block of a few KiB is over before the hardware prefetchers have learnt its streams,
 * so each starts with misses to L3; asking for the next block's first lines early hides
 * some of them (1000 float32 tensors of 1000 on Zen 4, medians of interleaved runs:
 * 1.03x faster at 1 thread, 1.06x at 2; 8, 16 or all 63 lines did no better). */
#define FA_NEXT_BLOCK_LINES 4

static void prefetch_block_start(const fa_block *b, size_t esize)
{
#if defined(__GNUC__) || defined(__clang__)
    const size_t bytes = b->n * esize;
    for (size_t q = 0; q < FA_NEXT_BLOCK_LINES * 64 && q < bytes; q += 64)
        for (int k = 0; k < FA_MAX_STREAMS; k++)
            if (b->stream[k]) __builtin_prefetch((const char *)b->stream[k] + q, k != FA_GRAD, 3);
#else
    (void)b;
    (void)esize;
#endif
}

/* prefetch: 0 none, 1 the next block's first lines, 2 that and within each block. */
static void run_range(fa_rule rule, fa_kernel_fn kernel, size_t esize, const fa_block *blocks,
                      size_t nblocks, size_t lo, size_t hi, int prefetch)
{
    /* Process elements [lo, hi) of the concatenation of all blocks. */
    consts_cache cache = {0};
    size_t start = 0; /* global index of blocks[b]'s first element */
    for (size_t b = 0; b < nblocks && start < hi; b++) {
        const fa_block *blk = &blocks[b];
        const size_t end = start + blk->n;
        if (end > lo && blk->n > 0) {
            if (prefetch && end < hi && b + 1 < nblocks)
                prefetch_block_start(&blocks[b + 1], esize);
            const size_t i0 = lo > start ? lo - start : 0;
            const size_t i1 = (hi < end ? hi : end) - start;
            const size_t off = i0 * esize;
            char *s[FA_MAX_STREAMS];
            for (int k = 0; k < FA_MAX_STREAMS; k++)
                s[k] = blk->stream[k] ? (char *)blk->stream[k] + off : (char *)0;
            kernel(consts_for(&cache, rule, blk), s, i1 - i0, prefetch == 2);
        }
        start = end;
    }
}

static int want_prefetch(int prefetch, size_t state_bytes)
{
    if (prefetch == FA_PREFETCH_OFF) return 0;
    if (prefetch != FA_PREFETCH_AUTO) return 2;
    size_t lo, hi;
    fa_prefetch_window(&lo, &hi);
    return state_bytes > lo && state_bytes <= hi ? 2 : 1;
}

void fa_step(fa_rule rule, fa_dtype dtype, const fa_block *blocks, size_t nblocks,
             int num_threads, size_t chunk, fa_isa isa, int prefetch)
{
    const fa_kernel_table *table = fa_table(isa);
    const fa_kernel_fn kernel = table->rule[rule][dtype == FA_FLOAT64];
    const size_t esize = dtype == FA_FLOAT64 ? sizeof(double) : sizeof(float);
    size_t total = 0;
    for (size_t b = 0; b < nblocks; b++) total += blocks[b].n;
    if (chunk == 0) chunk = FA_DEFAULT_CHUNK;
    /* The L3 is shared: the whole step's bytes count, every stream of the first block. */
    size_t nstreams = 0;
    for (int k = 0; nblocks > 0 && k < FA_MAX_STREAMS; k++) nstreams += blocks[0].stream[k] != 0;
    const int pf = want_prefetch(prefetch, total * esize * nstreams);

#ifdef _OPENMP
    /* Threads get at least `chunk` elements each (fewer threads when there is less
     * work: a fork/join costs microseconds), and equal shares of the concatenation of
     * all blocks, cut on multiples of 16 elements so no two threads write one cache
     * line. Every element is computed by exactly one thread with the same operations,
     * so the bits do not depend on the split. */
    size_t nt = num_threads > 0 ? (size_t)num_threads : (size_t)omp_get_max_threads();
    if (nt > (size_t)fa_thread_cap()) nt = (size_t)fa_thread_cap();
    if (nt > total / chunk) nt = total / chunk;
    if (nt > 1) {
#pragma omp parallel num_threads((int)nt)
        {
            const size_t k = (size_t)omp_get_thread_num();
            const size_t team = (size_t)omp_get_num_threads();
            const size_t lo = k == 0 ? 0 : (total / team * k + total % team * k / team) & ~(size_t)15;
            const size_t hi = k + 1 == team ? total
                              : (total / team * (k + 1) + total % team * (k + 1) / team) & ~(size_t)15;
            if (lo < hi) run_range(rule, kernel, esize, blocks, nblocks, lo, hi, pf);
        }
        return;
    }
#else
    (void)num_threads;
#endif
    run_range(rule, kernel, esize, blocks, nblocks, 0, total, pf);
}

size_t fa_grad_stats_workspace(size_t total_elements)
{
    return (total_elements + FA_NORM_CHUNK - 1) / FA_NORM_CHUNK;
}

/* Chunks [c0, c1) of the concatenated grads: one sum of squares per chunk into ws[c]. */
static void stats_range(fa_sumsq_fn sumsq, size_t esize, const fa_block *blocks, size_t nblocks,
                        size_t total, size_t c0, size_t c1, double *ws, double *nonfinite)
{
    size_t b = 0, start = 0; /* first block that ends after the chunk's start */
    for (size_t c = c0; c < c1; c++) {
        const size_t lo = c * FA_NORM_CHUNK;
        const size_t hi = lo + FA_NORM_CHUNK < total ? lo + FA_NORM_CHUNK : total;
        double acc[16] = {0};
        while (b < nblocks && start + blocks[b].n <= lo) start += blocks[b++].n;
        for (size_t bb = b, s = start; bb < nblocks && s < hi; s += blocks[bb++].n) {
            const size_t e = s + blocks[bb].n;
            const size_t i0 = lo > s ? lo - s : 0, i1 = (hi < e ? hi : e) - s;
            if (i1 > i0) sumsq((const char *)blocks[bb].stream[FA_GRAD] + i0 * esize, i1 - i0, acc, nonfinite);
        }
        double sum = acc[0];
        for (int j = 1; j < 16; j++) sum = sum + acc[j];
        ws[c] = sum;
    }
}

double fa_grad_stats(fa_dtype dtype, const fa_block *blocks, size_t nblocks, double *workspace,
                     int num_threads, fa_isa isa, int *nonfinite)
{
    const fa_kernel_table *table = fa_table(isa);
    const fa_sumsq_fn sumsq = table->sumsq[dtype == FA_FLOAT64];
    const size_t esize = dtype == FA_FLOAT64 ? sizeof(double) : sizeof(float);
    size_t total = 0;
    for (size_t b = 0; b < nblocks; b++) total += blocks[b].n;
    const size_t nchunks = fa_grad_stats_workspace(total);
    double nf = 0.0; /* NaN iff some element is inf or NaN; order of + is irrelevant to that */
#ifdef _OPENMP
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (nt > fa_thread_cap()) nt = fa_thread_cap();
    if (nt > 1 && nchunks > 1) {
        if ((size_t)nt > nchunks) nt = (int)nchunks;
#pragma omp parallel num_threads(nt) reduction(+ : nf)
        {
            const size_t k = (size_t)omp_get_thread_num();
            const size_t team = (size_t)omp_get_num_threads();
            stats_range(sumsq, esize, blocks, nblocks, total, nchunks * k / team,
                        nchunks * (k + 1) / team, workspace, &nf);
        }
    } else
#else
    (void)num_threads;
#endif
    {
        stats_range(sumsq, esize, blocks, nblocks, total, 0, nchunks, workspace, &nf);
    }
    double sum = 0.0;
    for (size_t c = 0; c < nchunks; c++) sum = sum + workspace[c];
    *nonfinite = nf != nf;
    return sum;
}

void fa_traffic_f32(float *const *streams, int nstreams, size_t n, int num_threads)
{
    const fa_kernel_table *table = fa_table(FA_ISA_AUTO);
    if (nstreams < 2) nstreams = 2;
    if (nstreams > 6) nstreams = 6;
#ifdef _OPENMP
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (nt > fa_thread_cap()) nt = fa_thread_cap();
    const size_t nchunks = (n + FA_DEFAULT_CHUNK - 1) / FA_DEFAULT_CHUNK;
    if (nt > 1 && nchunks > 1) {
#pragma omp parallel num_threads(nt)
        {
            const size_t k = (size_t)omp_get_thread_num();
            const size_t team = (size_t)omp_get_num_threads();
            const size_t lo = n * k / team, hi = n * (k + 1) / team;
            float *s[6];
            for (int j = 0; j < nstreams; j++) s[j] = streams[j] + lo;
            table->traffic(s, nstreams, hi - lo);
        }
        return;
    }
#else
    (void)num_threads;
#endif
    table->traffic(streams, nstreams, n);
}

int fa_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int fa_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int fa_thread_cap(void)
{
#ifdef _OPENMP
    const int procs = omp_get_num_procs();
    const int def = omp_get_max_threads();
    const int cap = procs > 0 && procs < (1 << 20) ? 4 * procs : 4;
    return def > cap ? def : cap;
#else
    return 1;
#endif
}
