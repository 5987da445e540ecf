/* dispatch.c -- CPU feature detection and the kernel table. Built with
 * baseline flags only: nothing here may execute an instruction the CPU lacks. */
#include "dispatch.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define FA_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif

/* Each path's table is defined by its kernel file (kernel.h, compiled with that path's
 * flags); indexed by fa_isa, NULL means "not compiled in". */
extern const fa_kernel_table fa_table_scalar;
#ifdef FA_HAVE_SSE2
extern const fa_kernel_table fa_table_sse2;
#endif
#ifdef FA_HAVE_AVX2
extern const fa_kernel_table fa_table_avx2;
#endif
#ifdef FA_HAVE_AVX512
extern const fa_kernel_table fa_table_avx512;
#endif
#ifdef FA_HAVE_NEON
extern const fa_kernel_table fa_table_neon;
#endif

static const fa_kernel_table *const fa_tables[FA_ISA_COUNT] = {
    &fa_table_scalar,
#ifdef FA_HAVE_SSE2
    &fa_table_sse2,
#else
    0,
#endif
#ifdef FA_HAVE_AVX2
    &fa_table_avx2,
#else
    0,
#endif
#ifdef FA_HAVE_AVX512
    &fa_table_avx512,
#else
    0,
#endif
#ifdef FA_HAVE_NEON
    &fa_table_neon,
#else
    0,
#endif
};

static const char *const fa_names[FA_ISA_COUNT] = {"scalar", "sse2", "avx2", "avx512", "neon"};

/* The dispatch state, set once by fa_init: the chosen path and what the CPU supports
 * (CPUID traps to the hypervisor under virtualisation, microseconds a call, so it is
 * asked once, not per step). */
static fa_isa fa_current = FA_ISA_SCALAR;
static int fa_initialised = 0;
static int fa_supported_cache[FA_ISA_COUNT];
static size_t fa_l3_bytes; /* prefetch_l3_bytes(): 0 where prefetching does not pay */

#ifdef FA_X86
static void cpuid(unsigned leaf, unsigned sub, unsigned r[4])
{
#if defined(_MSC_VER)
    int regs[4];
    __cpuidex(regs, (int)leaf, (int)sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)regs[i];
#else
    if (!__get_cpuid_count(leaf, sub, &r[0], &r[1], &r[2], &r[3])) r[0] = r[1] = r[2] = r[3] = 0;
#endif
}

static unsigned long long xgetbv0(void)
{
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
#endif
}
#endif

static int detect_supported(fa_isa isa)
{
    switch (isa) {
    case FA_ISA_SCALAR:
        return 1;
#ifdef FA_X86
    case FA_ISA_SSE2:
        return 1; /* part of x86-64 */
    case FA_ISA_AVX2:
    case FA_ISA_AVX512: {
        unsigned r1[4], r7[4];
        cpuid(0, 0, r1);
        if (r1[0] < 7) return 0;
        cpuid(1, 0, r1);
        cpuid(7, 0, r7);
        const int osxsave = (r1[2] >> 27) & 1, avx = (r1[2] >> 28) & 1, fma = (r1[2] >> 12) & 1;
        if (!osxsave || !avx) return 0;
        /* The OS must save the YMM (and for AVX-512, opmask and ZMM) state. */
        const unsigned long long xcr0 = xgetbv0();
        if ((xcr0 & 0x6) != 0x6) return 0;
        if (isa == FA_ISA_AVX2) return fma && ((r7[1] >> 5) & 1);
        /* AVX-512 F, BW and VL (every AVX-512 CPU since Skylake-SP, and Zen 4) */
        return ((r7[1] >> 16) & 1) && ((r7[1] >> 30) & 1) && ((r7[1] >> 31) & 1) &&
               (xcr0 & 0xe6) == 0xe6;
    }
#endif
#if defined(__aarch64__) || defined(_M_ARM64)
    case FA_ISA_NEON:
        return 1; /* part of AArch64 */
#endif
    default:
        return 0;
    }
}

/* The L3 size that sets the prefetch window (fastadam.h), or 0 where software prefetching
 * was not measured to pay. On Zen 3 (AMD family 19h, models 00-0Fh and 20-5Fh) a
 * 1e6-element float32 step ran 1.1-1.6x faster with it; on Zen 4 (family 19h, model 11h)
 * the same step, and 1.2e6 and 2e6, ran 5-18% slower (its L2 prefetcher keeps up).
 * Elsewhere it is unmeasured: 0, never. */
static size_t prefetch_l3_bytes(void)
{
#ifdef FA_X86
    unsigned r[4];
    cpuid(0, 0, r);
    if (r[1] != 0x68747541u || r[0] < 1) return 0; /* not "Auth"enticAMD */
    cpuid(1, 0, r);
    const unsigned base_family = (r[0] >> 8) & 0xf, ext = base_family == 0xf;
    const unsigned family = base_family + (ext ? (r[0] >> 20) & 0xff : 0);
    const unsigned model = ((r[0] >> 4) & 0xf) | (ext ? ((r[0] >> 16) & 0xf) << 4 : 0);
    if (family != 0x19 || !(model <= 0x0f || (model >= 0x20 && model <= 0x5f))) return 0;
    /* AMD's cache-topology leaf 0x8000001D describes one L3 instance, the cache a core
     * actually shares. (glibc's sysconf reads the legacy leaf 0x80000006, which under KVM
     * can report the whole socket: 256 MiB for 32.) */
    cpuid(0x80000000u, 0, r);
    if (r[0] < 0x8000001Du) return 0;
    for (unsigned i = 0; i < 16; i++) {
        cpuid(0x8000001Du, i, r);
        const unsigned type = r[0] & 31, level = (r[0] >> 5) & 7;
        if (type == 0) break;
        if (level == 3 && (type == 1 || type == 3)) {
            const size_t ways = ((r[1] >> 22) & 0x3ff) + 1, parts = ((r[1] >> 12) & 0x3ff) + 1;
            const size_t line = (r[1] & 0xfff) + 1, sets = (size_t)r[2] + 1;
            return ways * parts * line * sets;
        }
    }
    return 0;
#else
    return 0;
#endif
}

static void detect_all(void)
{
    for (int i = 0; i < FA_ISA_COUNT; i++) fa_supported_cache[i] = detect_supported((fa_isa)i);
    fa_l3_bytes = prefetch_l3_bytes();
}

void fa_prefetch_window(size_t *lo, size_t *hi)
{
    if (!fa_initialised) fa_init(FA_ISA_AUTO);
    *lo = fa_l3_bytes / 16 * 7;
    *hi = fa_l3_bytes;
}

int fa_isa_supported(fa_isa isa)
{
    if (isa < 0 || isa >= FA_ISA_COUNT) return 0;
    if (!fa_initialised) fa_init(FA_ISA_AUTO);
    return fa_supported_cache[isa];
}

int fa_isa_compiled(fa_isa isa)
{
    return isa >= 0 && isa < FA_ISA_COUNT && fa_tables[isa] != 0;
}

int fa_isa_usable(fa_isa isa)
{
    return fa_isa_compiled(isa) && fa_isa_supported(isa);
}

const char *fa_isa_name(fa_isa isa)
{
    return isa >= 0 && isa < FA_ISA_COUNT ? fa_names[isa] : "auto";
}

int fa_init(fa_isa force)
{
    if (!fa_initialised) {
        detect_all();
        (void)fa_q8_init(); /* cannot fail for the shipped maps (tests/test_formats.py) */
    }
    fa_initialised = 1; /* the support table is valid from here on */
    if (force != FA_ISA_AUTO) {
        if (!fa_isa_usable(force)) return -1;
        fa_current = force;
    } else {
        fa_isa best = FA_ISA_SCALAR;
        for (int i = 0; i < FA_ISA_COUNT; i++)
            if (fa_isa_usable((fa_isa)i)) best = (fa_isa)i; /* enum is in order of preference */
        fa_current = best;
    }
    fa_initialised = 1;
    return fa_current;
}

fa_isa fa_isa_current(void)
{
    if (!fa_initialised) fa_init(FA_ISA_AUTO);
    return fa_current;
}

const fa_kernel_table *fa_table(fa_isa isa)
{
    return fa_tables[isa == FA_ISA_AUTO ? fa_isa_current() : isa];
}
