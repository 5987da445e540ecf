#!/usr/bin/env bash
# Same bits on aarch64 (issue 12): build tests/c/digest.c with the C core natively
# (x86-64: scalar, sse2, avx2, avx512) and with Debian's aarch64 cross compiler (neon,
# scalar), run the aarch64 binary under qemu-user, and require every case's digest to be
# the same on every path of both architectures. Exits non-zero on any difference.
# Needs: gcc-aarch64-linux-gnu qemu-user (apt-get install -y gcc-aarch64-linux-gnu qemu-user).
# Flags are CMakeLists.txt's for the core: -O3 -ffp-contract=off -fno-math-errno, the
# scalar path without auto-vectorisation, each ISA's flags on its own file only.
set -euo pipefail
cd "$(dirname "$0")/.."
CC_X86="${CC:-cc}"
CC_ARM="${CC_AARCH64:-aarch64-linux-gnu-gcc}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
SYSROOT="${AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"
out="${1:-$(mktemp -d)}"
mkdir -p "$out"

for tool in "$CC_X86" "$CC_ARM" "$QEMU"; do
  command -v "$tool" >/dev/null || { echo "aarch64 digests: $tool not found" >&2; exit 2; }
done

COMMON=(-std=gnu99 -O3 -ffp-contract=off -fno-math-errno -Icsrc)
NOVEC=(-fno-tree-vectorize -fno-tree-slp-vectorize)

# build <compiler> <binary> <ISA:flags>... ; OpenMP when the toolchain has libgomp. The
# objects compile in parallel (the per-ISA kernel files take most of the time).
build() {
  local cc="$1" bin="$2"; shift 2
  local omp=() defs=() objs=() pids=()
  if echo 'int main(void){return 0;}' | "$cc" -fopenmp -x c - -o "$out/omp-probe" 2>/dev/null; then
    omp=(-fopenmp)
  else
    echo "  $cc: no OpenMP (libgomp): building serial (threads 2, 3 run on one)" >&2
  fi
  for spec in "$@"; do defs+=("-DFA_HAVE_${spec%%:*}"); done
  local d="$out/$(basename "$bin").o"; mkdir -p "$d"
  for src in engine rules formats dispatch; do
    "$cc" "${COMMON[@]}" "${defs[@]}" "${omp[@]}" -c "csrc/$src.c" -o "$d/$src.o" & pids+=($!)
    objs+=("$d/$src.o")
  done
  "$cc" "${COMMON[@]}" "${defs[@]}" "${omp[@]}" "${NOVEC[@]}" -c csrc/isa_scalar.c \
      -o "$d/isa_scalar.o" & pids+=($!)
  objs+=("$d/isa_scalar.o")
  for spec in "$@"; do
    local name; name="$(echo "${spec%%:*}" | tr 'A-Z' 'a-z')"
    local flags=(); read -r -a flags <<< "${spec#*:}"
    "$cc" "${COMMON[@]}" "${defs[@]}" "${omp[@]}" "${flags[@]}" -c "csrc/isa_$name.c" \
        -o "$d/isa_$name.o" & pids+=($!)
    objs+=("$d/isa_$name.o")
  done
  "$cc" "${COMMON[@]}" "${omp[@]}" -c tests/c/digest.c -o "$d/digest.o" & pids+=($!)
  local ok=1
  for p in "${pids[@]}"; do wait "$p" || ok=0; done
  [ "$ok" -eq 1 ] || { echo "build with $cc failed" >&2; exit 2; }
  "$cc" "${omp[@]}" -o "$bin" "$d/digest.o" "${objs[@]}" -lm
}

t0=$SECONDS
build "$CC_X86" "$out/digest-x86_64" "SSE2: " "AVX2:-mavx2 -mfma" \
      "AVX512:-mavx512f -mavx512bw -mavx512vl -mprefer-vector-width=512"
t1=$SECONDS
build "$CC_ARM" "$out/digest-aarch64" "NEON: "
t2=$SECONDS
echo "built: x86-64 $((t1 - t0)) s, aarch64 (cross) $((t2 - t1)) s"

# OpenMP's waiting threads sleep instead of spinning: many short steps with more threads
# than cores (CI, qemu) would otherwise spend most of the time spinning (17 s vs 1 s).
export OMP_WAIT_POLICY=passive
rc=0
"$out/digest-x86_64" > "$out/x86_64.txt" || rc=$?
t3=$SECONDS
"$QEMU" -L "$SYSROOT" "$out/digest-aarch64" > "$out/aarch64.txt" || rc=$?
t4=$SECONDS
echo "ran: x86-64 $((t3 - t2)) s, aarch64 under qemu $((t4 - t3)) s"
grep '^#' "$out/x86_64.txt" | sed 's/^/x86-64: /'
grep '^#' "$out/aarch64.txt" | sed 's/^/aarch64: /'
grep -h '^MISMATCH' "$out/x86_64.txt" "$out/aarch64.txt" || true
[ "$rc" -eq 0 ] || echo "a digest program reported a mismatch within its architecture (above)"

# Every path of both architectures must give the same (case, digest) list.
ref=""
for arch in x86_64 aarch64; do
  for path in $(awk '$1 == "path" {print $2}' "$out/$arch.txt"); do
    awk -v p="$path" '$1 == "case" && $2 == p {print $3, $4}' "$out/$arch.txt" > "$out/$arch-$path.cases"
    n=$(wc -l < "$out/$arch-$path.cases")
    total=$(awk -v p="$path" '$1 == "path" && $2 == p {print $3}' "$out/$arch.txt")
    printf '%-8s %-7s %s (%s cases)\n' "$arch" "$path" "$total" "$n"
    if [ -z "$ref" ]; then
      ref="$out/$arch-$path.cases"
      [ "$n" -gt 0 ] || { echo "no cases from $arch $path"; rc=1; }
    elif ! cmp -s "$ref" "$out/$arch-$path.cases"; then
      echo "DIFFERENT from $(basename "$ref" .cases):"
      diff "$ref" "$out/$arch-$path.cases" | head -40 || true
      rc=1
    fi
  done
done
for need in x86_64-scalar aarch64-scalar aarch64-neon; do
  [ -s "$out/$need.cases" ] || { echo "no digests from $need"; rc=1; }
done
echo "-- case digests (the same on every path above)"
cat "$ref"
if [ "$rc" -eq 0 ]; then
  echo "aarch64 digests: OK, aarch64 (neon, scalar) = x86-64 (every path), $(wc -l < "$ref") cases"
else
  echo "aarch64 digests: FAILED"
fi
exit "$rc"
