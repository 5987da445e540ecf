#!/usr/bin/env python3
"""Check that fastadam's x86-64 binary needs no instruction beyond the x86-64 baseline
(SSE/SSE2) outside the per-ISA kernels.

CMakeLists.txt compiles csrc/isa_avx2.c and csrc/isa_avx512.c (only those) with -mavx2 /
-mavx512*; every other object -- the engine, the rules' host side, the formats, the
dispatcher, the scalar and sse2 kernels and the Cython extension -- must run on any
x86-64 CPU, since the dispatcher only picks a path after it has asked CPUID. A stray flag
(or a `-march=...` on the whole target) would make `import fastadam` die with SIGILL on
an older CPU; this check catches that at build time.

It disassembles (objdump -d) each object file of a build directory (the pyproject's
build-dir, build/<wheel tag>, or any -C build-dir=...) and fails if a baseline object uses:
  * a ymm/zmm register or an AVX-512 mask register (%k0-%k7);
  * any VEX/EVEX-encoded instruction (AT&T mnemonics starting with 'v': vmovss, vfmadd...,
    vzeroupper), which covers AVX, AVX2, FMA, F16C and AVX-512;
  * an SSE3/SSSE3/SSE4.1/SSE4.2/POPCNT/LZCNT/BMI1/BMI2/MOVBE/ADX/... mnemonic (list below).
The only exception: `xgetbv` in dispatch.c.o, executed only after CPUID reports OSXSAVE.

Usage: check_baseline_isa.py BUILD_DIR [BUILD_DIR...]   (or object files directly)
Exit 0: clean; 1: a leak (listed); 2: nothing to check / usage error.
On a non-x86-64 build (no isa_sse2.c.o) it says so and exits 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# Objects allowed to use instructions beyond the baseline: the per-ISA kernels.
ISA_OBJECTS = {"isa_avx2.c.o", "isa_avx512.c.o"}
# Allowed exceptions elsewhere: object -> mnemonics.
ALLOWED = {"dispatch.c.o": {"xgetbv"}}

# Non-VEX mnemonics beyond SSE2 (AT&T spelling as objdump prints it; suffixes such as
# l/q/w are stripped before comparing where noted).
BEYOND_BASELINE = {
    # SSE3
    "addsubps",
    "addsubpd",
    "haddps",
    "haddpd",
    "hsubps",
    "hsubpd",
    "lddqu",
    "movddup",
    "movshdup",
    "movsldup",
    "fisttp",
    "fisttps",
    "fisttpl",
    "fisttpll",
    "monitor",
    "mwait",
    # SSSE3
    "pabsb",
    "pabsw",
    "pabsd",
    "palignr",
    "phaddw",
    "phaddd",
    "phaddsw",
    "phsubw",
    "phsubd",
    "phsubsw",
    "pmaddubsw",
    "pmulhrsw",
    "pshufb",
    "psignb",
    "psignw",
    "psignd",
    # SSE4.1
    "blendps",
    "blendpd",
    "blendvps",
    "blendvpd",
    "dpps",
    "dppd",
    "extractps",
    "insertps",
    "movntdqa",
    "mpsadbw",
    "packusdw",
    "pblendvb",
    "pblendw",
    "pcmpeqq",
    "pextrb",
    "pextrd",
    "pextrq",
    "phminposuw",
    "pinsrb",
    "pinsrd",
    "pinsrq",
    "pmaxsb",
    "pmaxsd",
    "pmaxud",
    "pmaxuw",
    "pminsb",
    "pminsd",
    "pminud",
    "pminuw",
    "pmovsxbw",
    "pmovsxbd",
    "pmovsxbq",
    "pmovsxwd",
    "pmovsxwq",
    "pmovsxdq",
    "pmovzxbw",
    "pmovzxbd",
    "pmovzxbq",
    "pmovzxwd",
    "pmovzxwq",
    "pmovzxdq",
    "pmuldq",
    "pmulld",
    "ptest",
    "roundps",
    "roundpd",
    "roundss",
    "roundsd",
    # SSE4.2, POPCNT, LZCNT/ABM, SSE4a
    "pcmpestri",
    "pcmpestrm",
    "pcmpistri",
    "pcmpistrm",
    "pcmpgtq",
    "crc32",
    "crc32b",
    "crc32w",
    "crc32l",
    "crc32q",
    "popcnt",
    "lzcnt",
    "extrq",
    "insertq",
    "movntss",
    "movntsd",
    # BMI1/BMI2 (tzcnt: executes as bsf on older CPUs but differs for 0; flagged anyway)
    "andn",
    "bextr",
    "blsi",
    "blsmsk",
    "blsr",
    "tzcnt",
    "bzhi",
    "mulx",
    "pdep",
    "pext",
    "rorx",
    "sarx",
    "shlx",
    "shrx",
    # MOVBE, ADX, AES, PCLMUL, SHA, RDRAND/RDSEED, XSAVE family, misc
    "movbe",
    "adcx",
    "adox",
    "aesenc",
    "aesenclast",
    "aesdec",
    "aesdeclast",
    "aesimc",
    "aeskeygenassist",
    "pclmulqdq",
    "sha1rnds4",
    "sha1nexte",
    "sha1msg1",
    "sha1msg2",
    "sha256rnds2",
    "sha256msg1",
    "sha256msg2",
    "rdrand",
    "rdseed",
    "xgetbv",
    "xsave",
    "xrstor",
    "xsaveopt",
    "clflushopt",
    "clwb",
    "prefetchw",
    "prefetchwt1",
}
REG_RE = re.compile(r"%(?:[yz]mm\d+|k[0-7])\b")
FUNC_RE = re.compile(r"^[0-9a-f]+ <(.+)>:$")
PREFIXES = {
    "lock",
    "rep",
    "repz",
    "repnz",
    "repe",
    "repne",
    "data16",
    "addr32",
    "notrack",
    "bnd",
    "cs",
    "ds",
    "es",
    "fs",
    "gs",
    "ss",
    "rex",
    "rex.w",
    "rex.b",
    "rex.x",
    "rex.r",
    "rex.wb",
    "rex.wr",
    "rex.wx",
    "rex.rb",
    "rex.rx",
    "rex.xb",
    "rex.wrb",
    "rex.wrx",
    "rex.wxb",
    "rex.rxb",
    "rex.wrxb",
    "{vex}",
    "{vex3}",
    "{evex}",
}


def mnemonic(text: str) -> str:
    words = text.split()
    while words and words[0] in PREFIXES:
        words = words[1:]
    return words[0] if words else ""


def beyond_baseline(mn: str, text: str) -> str | None:
    """The reason this instruction is beyond SSE2, or None."""
    if REG_RE.search(text):
        return "ymm/zmm/mask register"
    if mn.startswith("v") and mn not in ("verr", "verw"):
        return "VEX/EVEX-encoded"
    if mn in BEYOND_BASELINE or mn.rstrip("bwlq") in BEYOND_BASELINE:
        return "beyond SSE2"
    return None


def check_object(path: str, objdump: str) -> list[str]:
    name = os.path.basename(path)
    allowed = ALLOWED.get(name, set())
    out = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-w", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    leaks = []
    func = "?"
    for line in out.splitlines():
        m = FUNC_RE.match(line)
        if m:
            func = m.group(1)
            continue
        # with --no-show-raw-insn: "  12:\tmov    %rsp,%rbp"
        parts = line.split(":\t", 1)
        if (
            len(parts) != 2
            or not parts[0].strip()
            or not all(c in "0123456789abcdef" for c in parts[0].strip())
        ):
            continue
        text = parts[1].split("#")[0].strip()
        if not text or text.startswith("(bad)"):
            continue
        mn = mnemonic(text)
        if mn in allowed:
            continue
        why = beyond_baseline(mn, text)
        if why:
            leaks.append(f"{name}: {func}: {text}   [{why}]")
    return leaks


def objects_in(target: str) -> list[str]:
    if os.path.isfile(target):
        return [target]
    found = []
    for root, _dirs, files in os.walk(target):
        found += [os.path.join(root, f) for f in files if f.endswith((".o", ".obj"))]
    return sorted(found)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 2
    objdump = os.environ.get("OBJDUMP") or shutil.which("objdump")
    if not objdump:
        print("check_baseline_isa: no objdump (binutils) on PATH")
        return 2
    objects = [o for t in argv for o in objects_in(t)]
    if not objects:
        print(f"check_baseline_isa: no object files under {' '.join(argv)}")
        return 2
    names = {os.path.basename(o) for o in objects}
    if os.path.isdir(argv[0]) and "isa_sse2.c.o" not in names:
        print("check_baseline_isa: no isa_sse2.c.o: not an x86-64 build, nothing to check")
        return 0
    checked, leaks = 0, []
    for obj in objects:
        if os.path.basename(obj) in ISA_OBJECTS:
            print(f"  skip {os.path.relpath(obj)} (per-ISA kernel)")
            continue
        obj_leaks = check_object(obj, objdump)
        checked += 1
        print(f"  {'LEAK' if obj_leaks else 'ok  '} {os.path.relpath(obj)}")
        leaks += obj_leaks
    if leaks:
        print(
            f"\n{len(leaks)} instruction(s) beyond the x86-64 baseline outside the per-ISA kernels:"
        )
        for line in leaks[:50]:
            print("   ", line)
        if len(leaks) > 50:
            print(f"    ... and {len(leaks) - 50} more")
        return 1
    print(f"check_baseline_isa: {checked} baseline object(s): x86-64 baseline only (SSE2)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
