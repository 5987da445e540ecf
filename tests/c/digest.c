/* tests/c/digest.c -- digests of every rule's kernels on every SIMD path this CPU has.
 *
 * Drives the C core only through its public API (csrc/fastadam.h), as _core.pyx does:
 * fa_block structs (streams, formats, absmax, master-weight image, stochastic rounding),
 * fa_options with the rule's hyper array, fa_step with an explicit fa_isa, and
 * fa_grad_stats. Inputs come from an integer PRNG (no libc rand, no libm), so they are
 * the same bits on every platform. For each usable path and each case (rule x option
 * set x dtype / storage formats) it runs several steps over blocks of odd sizes with
 * unaligned starts, for 1, 2 and 3 threads with a small chunk (threads really split),
 * and prints one line
 *     case <path> <case> <fnv1a-64 of every output byte>
 * then one line per path
 *     path <path> <digest of its case digests> <cases>
 * It exits non-zero if a digest differs between thread counts or between paths.
 * tools/aarch64_digests.sh builds it for x86-64 and aarch64 (qemu) and compares the two.
 */
#include "fastadam.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- deterministic inputs --------------------------------------------------------- */
static uint64_t rng_state;
static uint64_t next64(void) /* splitmix64 */
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* A value in [-1, 1) (or [0, 1) when nonneg) with 23 significant bits: exact in float. */
static double rnd(int nonneg)
{
    int64_t k = (int64_t)(next64() >> 40); /* [0, 2^24) */
    if (!nonneg)
        k -= (int64_t)1 << 23;
    else
        k >>= 1;
    return (double)k * (1.0 / 8388608.0);
}
static uint16_t rnd_bf16(void) /* a float in [-1, 1), truncated to bfloat16 */
{
    float f = (float)rnd(0);
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}
static uint16_t rnd_f16(void) /* a normal binary16 of magnitude in [2^-5, 2) */
{
    uint64_t r = next64();
    unsigned sign = (unsigned)(r >> 63), exp = 10u + (unsigned)((r >> 32) % 6u);
    return (uint16_t)((sign << 15) | (exp << 10) | (unsigned)(r & 0x3FFu));
}

/* ---- FNV-1a ----------------------------------------------------------------------- */
static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}
#define FNV_INIT 0xCBF29CE484222325ull

/* ---- cases ------------------------------------------------------------------------ */
typedef struct optset {
    fa_rule rule;
    const char *name;
    double lr, wd, grad_scale, ema_decay;
    int maximize, ema;
    double hyper[FA_MAX_HYPER];
} optset;

static const optset OPTS[] = {
    /* Adam: beta1 beta2 eps decoupled amsgrad bias_correction eps_mode eps_root */
    {FA_RULE_ADAM, "adam", 1e-3, 0, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 0, 0, 1, 0, 0}},
    {FA_RULE_ADAM,
     "adam-l2-max-scale-ema",
     1e-2,
     0.01,
     3.0,
     0.99,
     1,
     1,
     {0.8, 0.99, 1e-6, 0, 0, 1, 0, 0}},
    {FA_RULE_ADAM, "adamw-amsgrad", 1e-3, 0.1, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 1, 1, 1, 0, 0}},
    {FA_RULE_ADAM, "adam-hat", 3e-3, 0, 1, 0, 0, 0, {0.9, 0.95, 1e-8, 0, 0, 1, 1, 0}},
    {FA_RULE_ADAM, "adam-epsroot-nobc", 1e-3, 0, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 0, 0, 0, 0, 1e-8}},
    /* SGD: momentum dampening nesterov */
    {FA_RULE_SGD, "sgd", 0.1, 0, 1, 0, 0, 0, {0, 0, 0}},
    {FA_RULE_SGD, "sgd-momentum-damp-l2", 0.05, 1e-4, 1, 0, 0, 0, {0.9, 0.1, 0}},
    {FA_RULE_SGD, "sgd-nesterov-max-ema", 0.05, 0, 2.0, 0.9, 1, 1, {0.9, 0, 1}},
    /* Adagrad: lr_decay eps */
    {FA_RULE_ADAGRAD, "adagrad", 0.01, 0, 1, 0, 0, 0, {0, 1e-10}},
    {FA_RULE_ADAGRAD, "adagrad-decay-l2", 0.01, 0.01, 1, 0, 0, 0, {0.01, 1e-10}},
    /* RMSprop: alpha eps momentum centered */
    {FA_RULE_RMSPROP, "rmsprop", 0.01, 0, 1, 0, 0, 0, {0.99, 1e-8, 0, 0}},
    {FA_RULE_RMSPROP, "rmsprop-momentum", 0.01, 0, 1, 0, 0, 0, {0.9, 1e-8, 0.9, 0}},
    {FA_RULE_RMSPROP, "rmsprop-centered-momentum-l2", 0.01, 0.01, 1, 0, 0, 0, {0.99, 1e-8, 0.5, 1}},
    /* Adamax: beta1 beta2 eps */
    {FA_RULE_ADAMAX, "adamax", 2e-3, 0, 1, 0, 0, 0, {0.9, 0.999, 1e-8}},
    {FA_RULE_ADAMAX, "adamax-l2-max", 2e-3, 0.01, 1, 0, 1, 0, {0.9, 0.999, 1e-8}},
    /* NAdam: beta1 beta2 eps momentum_decay decoupled */
    {FA_RULE_NADAM, "nadam", 2e-3, 0, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 4e-3, 0}},
    {FA_RULE_NADAM, "nadam-decoupled", 2e-3, 0.01, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 4e-3, 1}},
    {FA_RULE_NADAM, "nadam-l2-ema", 2e-3, 0.01, 1, 0.95, 0, 1, {0.9, 0.999, 1e-8, 4e-3, 0}},
    /* RAdam: beta1 beta2 eps decoupled (steps span both sides of rho_t > 5) */
    {FA_RULE_RADAM, "radam", 1e-3, 0, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 0}},
    {FA_RULE_RADAM, "radam-decoupled", 1e-3, 0.01, 1, 0, 0, 0, {0.9, 0.999, 1e-8, 1}},
    {FA_RULE_RADAM, "radam-l2-max", 1e-3, 0.01, 1, 0, 1, 0, {0.9, 0.999, 1e-8, 0}},
    /* Lion: beta1 beta2 */
    {FA_RULE_LION, "lion", 1e-4, 0, 1, 0, 0, 0, {0.9, 0.99}},
    {FA_RULE_LION, "lion-wd-max-ema", 1e-4, 0.1, 1, 0.999, 1, 1, {0.9, 0.99}},
};
#define NOPTS (sizeof OPTS / sizeof OPTS[0])

/* Storage configurations. state: the format of every state stream; FA_FMT_Q8_SIGNED
 * means 8-bit (unsigned map for the rule's streams that are never negative). */
typedef struct fmtcfg {
    const char *name;
    fa_dtype dtype;
    int param, grad, state, image, stochastic;
} fmtcfg;

static const fmtcfg FMTS[] = {
    {"f64", FA_FLOAT64, 0, 0, 0, 0, 0},
    {"f32", FA_FLOAT32, 0, 0, 0, 0, 0},
    {"bf16-all", FA_FLOAT32, FA_FMT_BF16, FA_FMT_BF16, FA_FMT_BF16, 0, 0},
    {"bf16-all-sr", FA_FLOAT32, FA_FMT_BF16, FA_FMT_BF16, FA_FMT_BF16, 0, 1},
    {"f16-param-grad", FA_FLOAT32, FA_FMT_F16, FA_FMT_F16, 0, 0, 0},
    {"f16-param-state-sr", FA_FLOAT32, FA_FMT_F16, 0, FA_FMT_F16, 0, 1},
    {"master-bf16-q8", FA_FLOAT32, 0, 0, FA_FMT_Q8_SIGNED, FA_FMT_BF16, 0},
    {"master-f16-bf16state-sr", FA_FLOAT32, 0, FA_FMT_BF16, FA_FMT_BF16, FA_FMT_F16, 1},
    {"bf16-param-q8-sr", FA_FLOAT32, FA_FMT_BF16, FA_FMT_BF16, FA_FMT_Q8_SIGNED, 0, 1},
};
#define NFMTS (sizeof FMTS / sizeof FMTS[0])

/* State streams (bit k: FA_STATE0 + k) that are never negative: 8-bit ones use the
 * unsigned map. */
static unsigned nonneg_states(fa_rule r)
{
    switch (r) {
    case FA_RULE_ADAM:
        return 2u | 4u;
    case FA_RULE_ADAGRAD:
        return 1u;
    case FA_RULE_RMSPROP:
        return 1u;
    case FA_RULE_ADAMAX:
        return 2u;
    case FA_RULE_NADAM:
        return 2u;
    case FA_RULE_RADAM:
        return 2u;
    default:
        return 0u;
    }
}

static const size_t SIZES[] = {1, 7, 33, 1000, 4099};
#define NBLK (sizeof SIZES / sizeof SIZES[0])
/* Element offset of each block's streams from a 64-byte boundary: unaligned starts
 * except the 1000-element block, which is aligned. */
static const size_t OFFS[] = {1, 1, 1, 0, 1};
#define NSTEPS 3
#define CHUNK  64

static size_t esize(const fmtcfg *f, int fmt)
{
    switch (fmt) {
    case FA_FMT_NATIVE:
        return f->dtype == FA_FLOAT64 ? 8 : 4;
    case FA_FMT_BF16:
    case FA_FMT_F16:
        return 2;
    default:
        return 1;
    }
}

static void *alloc_at(size_t bytes, size_t off_bytes, void **base)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes + off_bytes + 64) != 0) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    memset(p, 0, bytes + off_bytes + 64);
    *base = p;
    return (char *)p + off_bytes;
}

/* Fill a stream of n elements of format fmt with fixed values. */
static void fill(void *p, const fmtcfg *f, int fmt, size_t n, int nonneg, int grad)
{
    for (size_t i = 0; i < n; i++) {
        if (fmt == FA_FMT_BF16) {
            uint16_t v = rnd_bf16();
            if (nonneg) v &= 0x7FFF;
            if (grad && i % 17 == 5) v = 0;
            ((uint16_t *)p)[i] = v;
        } else if (fmt == FA_FMT_F16) {
            uint16_t v = rnd_f16();
            if (nonneg) v &= 0x7FFF;
            if (grad && i % 17 == 5) v = 0;
            ((uint16_t *)p)[i] = v;
        } else if (fmt == FA_FMT_NATIVE) {
            double v = rnd(nonneg);
            if (grad && i % 17 == 5) v = 0.0;
            if (f->dtype == FA_FLOAT64)
                ((double *)p)[i] = v;
            else
                ((float *)p)[i] = (float)v;
        }
    }
}

/* Move a nonnegative stream above every grad_avg^2: native and bf16 values of [0, 1)
 * (bf16: the float sum truncated to 16 bits) to [1.5, 2.5); f16 ones (of [2^-5, 2)) to
 * [8, 16). */
static void shift_up(void *p, const fmtcfg *f, int fmt, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (fmt == FA_FMT_BF16) {
            float x;
            uint32_t u = (uint32_t)((uint16_t *)p)[i] << 16;
            memcpy(&x, &u, 4);
            x += 1.5f;
            memcpy(&u, &x, 4);
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        } else if (fmt == FA_FMT_F16) {
            ((uint16_t *)p)[i] = (uint16_t)(0x4800u | (((uint16_t *)p)[i] & 0x3FFu));
        } else if (f->dtype == FA_FLOAT64) {
            ((double *)p)[i] += 1.5;
        } else {
            ((float *)p)[i] += 1.5f;
        }
    }
}

/* NaNs among n elements of format fmt (8-bit codes: none). */
static size_t count_nan(const void *p, const fmtcfg *f, int fmt, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++) {
        if (fmt == FA_FMT_BF16)
            c += (((const uint16_t *)p)[i] & 0x7FFF) > 0x7F80;
        else if (fmt == FA_FMT_F16)
            c += (((const uint16_t *)p)[i] & 0x7FFF) > 0x7C00;
        else if (fmt == FA_FMT_NATIVE && f->dtype == FA_FLOAT64) {
            uint64_t u;
            memcpy(&u, (const double *)p + i, 8);
            c += (u & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull;
        } else if (fmt == FA_FMT_NATIVE) {
            uint32_t u;
            memcpy(&u, (const float *)p + i, 4);
            c += (u & 0x7FFFFFFFu) > 0x7F800000u;
        }
    }
    return c;
}

/* One run of a case: set up the blocks, NSTEPS steps, digest of every output byte. */
static uint64_t run_case(const optset *o_, const fmtcfg *f, fa_isa isa, int threads, int prefetch,
                         size_t *nans)
{
    fa_options o;
    memset(&o, 0, sizeof o);
    o.lr = o_->lr;
    o.weight_decay = o_->wd;
    o.grad_scale = o_->grad_scale;
    o.ema_decay = o_->ema_decay;
    o.maximize = o_->maximize;
    o.ema = o_->ema;
    memcpy(o.hyper, o_->hyper, sizeof o.hyper);
    const fa_rule rule = o_->rule;
    const unsigned req = fa_rule_required(rule, &o), nonneg = nonneg_states(rule);

    fa_block blk[NBLK];
    void *bases[NBLK][FA_MAX_STREAMS * 2 + 1];
    size_t nbases[NBLK];
    size_t total = 0;
    rng_state = 0x5EED0000ull + (uint64_t)rule * 1000003ull;
    memset(blk, 0, sizeof blk);
    for (size_t b = 0; b < NBLK; b++) {
        const size_t n = SIZES[b];
        fa_block *B = &blk[b];
        nbases[b] = 0;
        total += n;
        B->n = n;
        B->options = &o;
        B->scalar = 1.0; /* NAdam's mu_product before its first step */
        for (int k = 0; k < FA_MAX_STREAMS; k++) {
            int fmt;
            int nn = 0;
            if (k == FA_PARAM)
                fmt = f->param;
            else if (k == FA_GRAD)
                fmt = f->grad;
            else if (k == FA_EMA) {
                if (!o.ema) continue;
                fmt = FA_FMT_NATIVE;
            } else {
                const int s = k - FA_STATE0;
                if (!(req & (1u << s))) continue;
                nn = (nonneg >> s) & 1u;
                fmt = f->state;
                if (fmt == FA_FMT_Q8_SIGNED && nn) fmt = FA_FMT_Q8_UNSIGNED;
            }
            const size_t es = esize(f, fmt);
            B->stream[k] = alloc_at(n * es, OFFS[b] * es, &bases[b][nbases[b]++]);
            B->format[k] = (unsigned char)fmt;
            if (fmt == FA_FMT_Q8_SIGNED || fmt == FA_FMT_Q8_UNSIGNED) {
                /* absmax 0: every code stands for 0, the state's initial value */
                const size_t nq = (n + FA_Q8_BLOCK - 1) / FA_Q8_BLOCK;
                B->absmax[k] = (float *)alloc_at(nq * 4, OFFS[b] * 4, &bases[b][nbases[b]++]);
            } else if (k == FA_PARAM || k == FA_GRAD || k == FA_EMA) {
                fill(B->stream[k], f, fmt, n, 0, k == FA_GRAD);
            } else {
                fill(B->stream[k], f, fmt, n, nn, 0);
                if (rule == FA_RULE_RMSPROP && k == FA_STATE0)
                    /* centered: square_avg > grad_avg^2, so that
                     * square_avg - grad_avg^2 stays positive (no NaN: its sign bit is
                     * not the same on every architecture) */
                    shift_up(B->stream[k], f, fmt, n);
            }
        }
        if (f->image) {
            B->image = alloc_at(n * 2, OFFS[b] * 2, &bases[b][nbases[b]++]);
            B->image_format = (unsigned char)f->image;
        }
        B->stochastic = (unsigned char)f->stochastic;
        B->rng_base = fa_rng_base(12345u, (uint64_t)b);
    }

    uint64_t h = FNV_INIT;
    /* gradient statistics of the (fixed) grads */
    {
        double *ws = (double *)malloc(fa_grad_stats_workspace(total) * sizeof(double) + 8);
        int nonfinite = -1;
        double ss = fa_grad_stats(f->dtype, blk, NBLK, ws, threads, isa, &nonfinite);
        h = fnv(h, &ss, 8);
        h = fnv(h, &nonfinite, sizeof nonfinite);
        free(ws);
    }
    for (int s = 1; s <= NSTEPS; s++) {
        /* block b takes steps 3b+1 .. 3b+NSTEPS: first steps and later ones (RAdam's
         * rectification starts at t = 6 with beta2 = 0.999) in every call */
        for (size_t b = 0; b < NBLK; b++) blk[b].step = (double)(s + 3 * (int)b);
        fa_step(rule, f->dtype, blk, NBLK, threads, CHUNK, isa, prefetch);
        for (size_t b = 0; b < NBLK; b++)
            blk[b].scalar = fa_scalar_after(rule, &o, blk[b].step, blk[b].scalar);
    }
    for (size_t b = 0; b < NBLK; b++) {
        const fa_block *B = &blk[b];
        for (int k = 0; k < FA_MAX_STREAMS; k++) {
            if (k == FA_GRAD || !B->stream[k]) continue;
            h = fnv(h, B->stream[k], B->n * esize(f, B->format[k]));
            *nans += count_nan(B->stream[k], f, B->format[k], B->n);
            if (B->absmax[k]) h = fnv(h, B->absmax[k], (B->n + FA_Q8_BLOCK - 1) / FA_Q8_BLOCK * 4);
        }
        if (B->image) {
            h = fnv(h, B->image, B->n * 2);
            *nans += count_nan(B->image, f, B->image_format, B->n);
        }
        h = fnv(h, &B->scalar, 8);
        for (size_t i = 0; i < nbases[b]; i++) free(bases[b][i]);
    }
    return h;
}

int main(void)
{
    enum { NCASES = NOPTS * NFMTS };
    static uint64_t dig[FA_ISA_COUNT][NCASES];
    int have[FA_ISA_COUNT] = {0};
    int first = -1, bad = 0;
    static const int THREADS[] = {1, 2, 3};
    static const int PREFETCH[] = {FA_PREFETCH_AUTO, FA_PREFETCH_OFF, FA_PREFETCH_ON};

    fa_init(FA_ISA_AUTO);
    printf("# fastadam %s, openmp %d, thread cap %d, default path %s\n", FA_VERSION, fa_openmp(),
           fa_thread_cap(), fa_isa_name(fa_isa_current()));
    for (int isa = 0; isa < FA_ISA_COUNT; isa++) {
        if (!fa_isa_usable((fa_isa)isa)) continue;
        have[isa] = 1;
        if (first < 0) first = isa;
        uint64_t ph = FNV_INIT;
        for (size_t oi = 0; oi < NOPTS; oi++) {
            for (size_t fi = 0; fi < NFMTS; fi++) {
                const size_t c = oi * NFMTS + fi;
                uint64_t d0 = 0;
                size_t nans = 0;
                for (int ti = 0; ti < 3; ti++) {
                    uint64_t d = run_case(&OPTS[oi], &FMTS[fi], (fa_isa)isa, THREADS[ti],
                                          PREFETCH[ti], &nans);
                    if (ti == 0)
                        d0 = d;
                    else if (d != d0) {
                        printf("MISMATCH threads %s %s/%s: 1 thread %016llx, %d threads "
                               "%016llx\n",
                               fa_isa_name((fa_isa)isa), OPTS[oi].name, FMTS[fi].name,
                               (unsigned long long)d0, THREADS[ti], (unsigned long long)d);
                        bad = 1;
                    }
                }
                dig[isa][c] = d0;
                ph = fnv(ph, &d0, 8);
                /* a NaN's sign bit is not the same on every architecture (x86's
                 * default NaN is negative, aarch64's positive): the inputs avoid them */
                printf("case %s %s/%s %016llx%s\n", fa_isa_name((fa_isa)isa), OPTS[oi].name,
                       FMTS[fi].name, (unsigned long long)d0, nans ? " has-NaN" : "");
                if (nans) bad = 1;
            }
        }
        printf("path %s %016llx %d\n", fa_isa_name((fa_isa)isa), (unsigned long long)ph,
               (int)NCASES);
    }
    for (int isa = 0; isa < FA_ISA_COUNT; isa++) {
        if (!have[isa] || isa == first) continue;
        for (size_t c = 0; c < NCASES; c++) {
            if (dig[isa][c] != dig[first][c]) {
                printf("MISMATCH paths %s/%s: %s %016llx, %s %016llx\n", OPTS[c / NFMTS].name,
                       FMTS[c % NFMTS].name, fa_isa_name((fa_isa)first),
                       (unsigned long long)dig[first][c], fa_isa_name((fa_isa)isa),
                       (unsigned long long)dig[isa][c]);
                bad = 1;
            }
        }
    }
    printf(bad ? "FAIL: digests differ\n"
               : "OK: every path and thread count gives the same digests\n");
    return bad ? 1 : 0;
}
