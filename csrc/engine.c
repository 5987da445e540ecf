/* engine.c -- what every rule shares: one OpenMP region over all blocks, the per-block
 * constants, prefetching, the gradient statistics pass and the call through the kernel
 * table. It names no rule's state. Built with baseline flags only. */
#include "fastadam.h"
#include "dispatch.h"

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

unsigned fa_traffic_sink; /* keeps the traffic pattern's reads alive; never read */

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

/* A block whose streams are all in the call's dtype is updated in place. Any other block
 * goes tile by tile: each stored stream is loaded into a float32 tile (in L1), the
 * float32 kernel runs on the tiles (and on the float32 streams in place), and the written
 * streams are stored back -- still one pass over memory. 512 elements: 8 streams of
 * tiles take 16 KiB, a tile is a whole number of 8-bit blocks, and the kernel's per-call
 * cost is spread over enough elements. */
#define FA_TILE 512
#if defined(_MSC_VER)
#define FA_ALIGN64 __declspec(align(64))
#else
#define FA_ALIGN64 __attribute__((aligned(64)))
#endif

static int is_formatted(const fa_block *b)
{
    if (b->image) return 1;
    for (int k = 0; k < FA_MAX_STREAMS; k++)
        if (b->stream[k] && b->format[k] != FA_FMT_NATIVE) return 1;
    return 0;
}

static void stream_keys(const fa_block *blk, fa_fused *fx);

static void run_tiles(const fa_kernel_table *table, fa_kernel_fn kernel, const fa_consts *c,
                      const fa_block *blk, size_t i0, size_t i1)
{
    /* aligned tiles: the kernels' loads and stores are then aligned too */
    FA_ALIGN64 float tile[FA_MAX_STREAMS][FA_TILE];
    fa_fused fx;
    const uint32_t *key[FA_MAX_STREAMS];
    stream_keys(blk, &fx);
    for (int k = 0; k < FA_MAX_STREAMS; k++) key[k] = blk->stochastic ? fx.key[k] : 0;
    for (size_t t0 = i0; t0 < i1;) {
        size_t t1 = i1 - t0 < FA_TILE ? i1 : t0 + FA_TILE;
        /* the random bits take the element index's high half once per tile */
        if ((t0 >> 16 >> 16) != ((t1 - 1) >> 16 >> 16)) t1 = ((t0 >> 16 >> 16) + 1) << 16 << 16;
        const size_t len = t1 - t0;
        char *s[FA_MAX_STREAMS];
        for (int k = 0; k < FA_MAX_STREAMS; k++) {
            if (!blk->stream[k]) {
                s[k] = 0;
            } else if (blk->format[k] == FA_FMT_NATIVE) {
                s[k] = (char *)blk->stream[k] + t0 * sizeof(float);
            } else {
                table->load[blk->format[k]](blk->stream[k], t0, len, tile[k], blk->absmax[k]);
                s[k] = (char *)tile[k];
            }
        }
        kernel(c, s, len, 0, 0);
        for (int k = 0; k < FA_MAX_STREAMS; k++)
            if (k != FA_GRAD && blk->stream[k] && blk->format[k] != FA_FMT_NATIVE)
                table->store[blk->format[k]](tile[k], blk->stream[k], t0, len, blk->absmax[k],
                                             key[k]);
        if (blk->image)
            table->store[blk->image_format]((const float *)s[FA_PARAM], blk->image, t0, len, 0,
                                            key[FA_PARAM]);
        t0 = t1;
    }
}

/* A block of bfloat16 param, grad and state (float32 average) runs in one fused loop
 * (kernel.h), not through tiles. */
static int is_fused_bf16(const fa_block *b)
{
    if (b->image || b->format[FA_PARAM] != FA_FMT_BF16 || b->format[FA_GRAD] != FA_FMT_BF16)
        return 0;
    for (int k = FA_STATE0; k < FA_EMA; k++)
        if (b->stream[k] && b->format[k] != FA_FMT_BF16) return 0;
    return !b->stream[FA_EMA] || b->format[FA_EMA] == FA_FMT_NATIVE;
}

static void stream_keys(const fa_block *blk, fa_fused *fx)
{
    for (int k = 0; k < FA_MAX_STREAMS; k++) {
        const uint64_t sk =
            blk->stochastic ? fa_stream_key(blk->rng_base, (uint64_t)blk->step, (unsigned)k) : 0;
        fx->key[k][0] = (uint32_t)sk;
        fx->key[k][1] = (uint32_t)(sk >> 32);
    }
}

static void run_fused(fa_kernel_fn kernel, const fa_consts *c, const fa_block *blk, size_t i0,
                      size_t i1)
{
    fa_fused fx;
    stream_keys(blk, &fx);
    for (size_t t0 = i0; t0 < i1;) {
        size_t t1 = i1; /* the random bits take the index's high half once per call */
        if ((t0 >> 16 >> 16) != ((t1 - 1) >> 16 >> 16)) t1 = ((t0 >> 16 >> 16) + 1) << 16 << 16;
        char *s[FA_MAX_STREAMS];
        for (int k = 0; k < FA_MAX_STREAMS; k++)
            s[k] = !blk->stream[k] ? (char *)0
                                   : (char *)blk->stream[k] +
                                         t0 * (k == FA_EMA ? sizeof(float) : sizeof(uint16_t));
        fx.i0 = t0;
        kernel(c, s, t1 - t0, 0, &fx);
        t0 = t1;
    }
}

/* prefetch: 0 none, 1 the next block's first lines, 2 that and within each block. */
static void run_range(fa_rule rule, const fa_kernel_table *table, fa_kernel_fn kernel, size_t esize,
                      const fa_block *blocks, size_t nblocks, size_t lo, size_t hi, int prefetch)
{
    /* Process elements [lo, hi) of the concatenation of all blocks. */
    consts_cache cache = {0};
    size_t start = 0; /* global index of blocks[b]'s first element */
    for (size_t b = 0; b < nblocks && start < hi; b++) {
        const fa_block *blk = &blocks[b];
        const size_t end = start + blk->n;
        if (end > lo && blk->n > 0) {
            if (prefetch && end < hi && b + 1 < nblocks && !is_formatted(&blocks[b + 1]))
                prefetch_block_start(&blocks[b + 1], esize);
            const size_t i0 = lo > start ? lo - start : 0;
            const size_t i1 = (hi < end ? hi : end) - start;
            if (is_fused_bf16(blk)) {
                run_fused(table->rule[rule][blk->stochastic ? FA_K_BF16_SR : FA_K_BF16],
                          consts_for(&cache, rule, blk), blk, i0, i1);
            } else if (is_formatted(blk)) {
                run_tiles(table, kernel, consts_for(&cache, rule, blk), blk, i0, i1);
            } else {
                const size_t off = i0 * esize;
                char *s[FA_MAX_STREAMS];
                for (int k = 0; k < FA_MAX_STREAMS; k++)
                    s[k] = blk->stream[k] ? (char *)blk->stream[k] + off : (char *)0;
                kernel(consts_for(&cache, rule, blk), s, i1 - i0, prefetch == 2, 0);
            }
        }
        start = end;
    }
}

/* A thread's share ends at `cut` of the concatenation, moved down to where its block's
 * own index is a multiple of FA_Q8_BLOCK (an 8-bit block is never split). Monotone in
 * cut, so consecutive shares stay contiguous and disjoint. */
static size_t snap(const fa_block *blocks, size_t nblocks, size_t cut)
{
    size_t start = 0;
    for (size_t b = 0; b < nblocks; b++) {
        const size_t end = start + blocks[b].n;
        if (cut < end) return start + ((cut - start) & ~(FA_Q8_BLOCK - 1));
        start = end;
    }
    return cut;
}

static int want_prefetch(int prefetch, size_t state_bytes)
{
    if (prefetch == FA_PREFETCH_OFF) return 0;
    if (prefetch != FA_PREFETCH_AUTO) return 2;
    size_t lo, hi;
    fa_prefetch_window(&lo, &hi);
    return state_bytes > lo && state_bytes <= hi ? 2 : 1;
}

void fa_step(fa_rule rule, fa_dtype dtype, const fa_block *blocks, size_t nblocks, int num_threads,
             size_t chunk, fa_isa isa, int prefetch)
{
    const fa_kernel_table *table = fa_table(isa);
    const fa_kernel_fn kernel = table->rule[rule][dtype == FA_FLOAT64 ? FA_K_F64 : FA_K_F32];
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
     * all blocks, cut at block-local multiples of 256 elements (snap), so no two threads
     * share an 8-bit block or, in aligned buffers, a cache line. Every element is computed by exactly one thread with the same operations,
     * so the bits do not depend on the split. */
    size_t nt = num_threads > 0 ? (size_t)num_threads : (size_t)omp_get_max_threads();
    if (nt > (size_t)fa_thread_cap()) nt = (size_t)fa_thread_cap();
    if (nt > total / chunk) nt = total / chunk;
    if (nt > 1) {
#pragma omp parallel num_threads((int)nt)
        {
            const size_t k = (size_t)omp_get_thread_num();
            const size_t team = (size_t)omp_get_num_threads();
            const size_t lo =
                k == 0 ? 0 : snap(blocks, nblocks, total / team * k + total % team * k / team);
            const size_t hi =
                k + 1 == team
                    ? total
                    : snap(blocks, nblocks, total / team * (k + 1) + total % team * (k + 1) / team);
            if (lo < hi) run_range(rule, table, kernel, esize, blocks, nblocks, lo, hi, pf);
        }
        return;
    }
#else
    (void)num_threads;
#endif
    run_range(rule, table, kernel, esize, blocks, nblocks, 0, total, pf);
}

size_t fa_grad_stats_workspace(size_t total_elements)
{
    return (total_elements + FA_NORM_CHUNK - 1) / FA_NORM_CHUNK;
}

/* Chunks [c0, c1) of the concatenated grads: one sum of squares per chunk into ws[c]. */
static void stats_range(const fa_sumsq_fn *sumsq, fa_dtype dtype, const fa_block *blocks,
                        size_t nblocks, size_t total, size_t c0, size_t c1, double *ws,
                        double *nonfinite)
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
            const int f = blocks[bb].format[FA_GRAD];
            const int which = f == FA_FMT_BF16      ? FA_SUMSQ_BF16
                              : f == FA_FMT_F16     ? FA_SUMSQ_F16
                              : dtype == FA_FLOAT64 ? FA_SUMSQ_F64
                                                    : FA_SUMSQ_F32;
            const size_t esize = which == FA_SUMSQ_F64 ? 8 : which == FA_SUMSQ_F32 ? 4 : 2;
            if (i1 > i0)
                sumsq[which]((const char *)blocks[bb].stream[FA_GRAD] + i0 * esize, i1 - i0, acc,
                             nonfinite);
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
    const fa_sumsq_fn *sumsq = table->sumsq;
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
            stats_range(sumsq, dtype, blocks, nblocks, total, nchunks * k / team,
                        nchunks * (k + 1) / team, workspace, &nf);
        }
    } else
#else
    (void)num_threads;
#endif
    {
        stats_range(sumsq, dtype, blocks, nblocks, total, 0, nchunks, workspace, &nf);
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

void fa_traffic(void *const *streams, const size_t *esize, int nstreams, size_t n, int num_threads)
{
    const fa_kernel_table *table = fa_table(FA_ISA_AUTO);
    unsigned sink = 0;
    if (nstreams < 2) return;
    if (nstreams > 8) nstreams = 8;
#ifdef _OPENMP
    int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
    if (nt > fa_thread_cap()) nt = fa_thread_cap();
    const size_t nchunks = (n + FA_DEFAULT_CHUNK - 1) / FA_DEFAULT_CHUNK;
    if (nt > 1 && nchunks > 1) {
#pragma omp parallel num_threads(nt) reduction(+ : sink)
        {
            const size_t k = (size_t)omp_get_thread_num();
            const size_t team = (size_t)omp_get_num_threads();
            const size_t lo = (n * k / team) & ~(size_t)63,
                         hi = k + 1 == team ? n : (n * (k + 1) / team) & ~(size_t)63;
            char *s[8];
            for (int j = 0; j < nstreams; j++) s[j] = (char *)streams[j] + lo * esize[j];
            if (lo < hi) table->traffic_any(s, esize, nstreams, hi - lo, &sink);
        }
    } else
#else
    (void)num_threads;
#endif
    {
        char *s[8];
        for (int j = 0; j < nstreams; j++) s[j] = (char *)streams[j];
        table->traffic_any(s, esize, nstreams, n, &sink);
    }
    *(volatile unsigned *)&fa_traffic_sink = sink;
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
