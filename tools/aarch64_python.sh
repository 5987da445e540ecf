#!/usr/bin/env bash
# fastadam's Python test suite on aarch64 under user-mode emulation (qemu-aarch64), from an
# x86-64 Debian 12 (bookworm) machine. The extension is cross-built here, with the flags of
# CMakeLists.txt (core: -O3 -ffp-contract=off -fno-math-errno; isa_scalar.c without
# auto-vectorisation; FA_HAVE_NEON; OpenMP; the Cython module with the Release flags only),
# and run by Debian's arm64 python3.11 and python3-numpy (1.24), unpacked (dpkg -x, nothing
# installed for arm64) into a sysroot that qemu-aarch64 -L uses. pytest, hypothesis (the
# pin of pyproject.toml) and ml_dtypes are aarch64 wheels from PyPI, installed with
# pip --target into that cache. No torch: its tests skip.
#
# Usage: tools/aarch64_python.sh [pytest arguments]
#   no arguments: the fast subset tests/test_core.py tests/test_optim.py tests/test_errors.py
#   all: the whole suite (tests/); anything else goes to pytest as given, paths relative to
#   the repository root, e.g.  tools/aarch64_python.sh tests/test_rules.py -k adamw -x
#   FASTADAM_SIMD=scalar tools/aarch64_python.sh tests/test_optim.py  (the scalar path)
#   FASTADAM_A64_REF=HEAD tools/aarch64_python.sh  (a commit, git archive'd, not the work tree)
# Environment: FASTADAM_A64_CACHE (default /tmp/fastadam-a64) holds the sysroot, the wheels,
#   the build and a copy of the tests; nothing is written into the repository. The sysroot
#   and wheels are reused by later runs; the extension is rebuilt when csrc/, _core.pyx,
#   _cfastadam.pxd or this script changed; the tests are recopied on every run.
#   FASTADAM_A64_PYTEST_TIMEOUT: a limit in seconds for the pytest run (default none).
# Needs: root, Debian bookworm amd64 with network access to deb.debian.org and PyPI, git;
#   qemu-user and gcc-aarch64-linux-gnu (installed with apt-get if missing), a host python3
#   with pip (Cython >= 3 is fetched into the cache if the host python lacks it). It adds the
#   arm64 architecture to dpkg (dpkg --add-architecture arm64) and runs apt-get update, so
#   that apt-get download can fetch arm64 packages; it installs no arm64 package. The
#   extension is compiled against the NumPy >= 2 headers of the aarch64 numpy wheel (as the
#   real build, pyproject's build requirement) and runs with Debian's numpy 1.24.
# Time (2 x86-64 cores, bookworm's qemu 7.2, wall): from an empty cache, sysroot + wheels
#   ~10 s on a fast network, cross-build ~90 s, the default subset ~140 s (4 min in all);
#   then ~2.5 min a run (the build is cached). The whole suite ("all", no torch): 453 s
#   measured on 2026-12-06 (1169 passed, 109 skipped), the hostile suite's hypothesis runs
#   the slowest part (test_hostile.py's numpy_api 83 s).
# The child processes that some tests start (sys.executable) run under qemu too: the
#   emulated python's sys.executable is a small wrapper script that starts qemu-aarch64
#   (no binfmt_misc needed).
set -euo pipefail
SCRIPT="$(readlink -f "$0")"
cd "$(dirname "$SCRIPT")/.."
REPO="$PWD"
CACHE="${FASTADAM_A64_CACHE:-/tmp/fastadam-a64}"
mkdir -p "$CACHE"
if [ -n "${FASTADAM_A64_REF:-}" ]; then
  # a commit instead of the working tree: git archive into the cache, built and tested there
  rm -rf "$CACHE/checkout"
  mkdir -p "$CACHE/checkout"
  git -C "$REPO" archive "$FASTADAM_A64_REF" | tar -C "$CACHE/checkout" -xf -
  echo "== testing $FASTADAM_A64_REF ($(git -C "$REPO" rev-parse --short "$FASTADAM_A64_REF")), not the working tree"
  cd "$CACHE/checkout"
fi
ROOT="$CACHE/root"          # the arm64 sysroot (Debian's libc6, python3.11, numpy, ...)
SITE="$CACHE/site"          # pytest, hypothesis, ml_dtypes for the emulated python
BUILD="$CACHE/build"        # objects; rebuilt every run
PKG="$CACHE/pkg"            # fastadam/ with the aarch64 extension
TREE="$CACHE/tree"          # a copy of tests/, bench/, examples/, csrc/, pyproject.toml
BIN="$CACHE/bin"            # python3.11 wrapper: qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11
CC_ARM="${CC_AARCH64:-aarch64-linux-gnu-gcc}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
HOSTPY="${HOST_PYTHON:-python3}"
HYPOTHESIS_PIN="$(sed -n 's/.*"\(hypothesis==[0-9.]*\)".*/\1/p' pyproject.toml | head -1)"
HYPOTHESIS_PIN="${HYPOTHESIS_PIN:-hypothesis}"
t_start=$SECONDS
declare -a REPORT=()
stage() { REPORT+=("$(printf '%-34s %5d s' "$1" $((SECONDS - $2)))"); }

# --- host tools ---------------------------------------------------------------------------
t0=$SECONDS
need_apt=()
command -v "$QEMU" >/dev/null || need_apt+=(qemu-user)
command -v "$CC_ARM" >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v "$HOSTPY" >/dev/null || need_apt+=(python3)
"$HOSTPY" -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "== dpkg --add-architecture arm64"
  dpkg --add-architecture arm64
  rm -f "$CACHE/.apt-updated"
fi
if [ ! -e "$CACHE/.apt-updated" ] || [ ! -e "$CACHE/root/.done" ] || [ "${#need_apt[@]}" -gt 0 ]; then
  echo "== apt-get update"
  apt-get update -qq
  touch "$CACHE/.apt-updated"
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# Cython >= 3 for the host (it only generates C; the C is compiled for aarch64 below)
CYTHON_PATH=""
if ! "$HOSTPY" -c 'import Cython, sys; sys.exit(int(Cython.__version__.split(".")[0]) < 3)' 2>/dev/null; then
  if [ ! -e "$CACHE/host-cython/.done" ]; then
    echo "== Cython >= 3 for the host python into $CACHE/host-cython"
    rm -rf "$CACHE/host-cython"
    "$HOSTPY" -m pip install -q --target "$CACHE/host-cython" --no-compile "cython>=3.0"
    touch "$CACHE/host-cython/.done"
  fi
  CYTHON_PATH="$CACHE/host-cython"
fi
stage "host tools" "$t0"

# --- the arm64 sysroot: Debian's packages unpacked, not installed -------------------------
t0=$SECONDS
DEBS=(libc6 libgcc-s1 libgomp1 libstdc++6 gcc-12-base
      libpython3.11-minimal python3.11-minimal libpython3.11-stdlib python3.11
      libpython3.11-dev python3-numpy
      libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6
      libreadline8 libcrypt1 libuuid1 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3
      libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 libzstd1 libmd0
      libblas3 liblapack3 libgfortran5)
if [ ! -e "$ROOT/.done" ]; then
  echo "== arm64 sysroot: apt-get download + dpkg -x into $ROOT"
  rm -rf "$ROOT" "$CACHE/debs"
  mkdir -p "$CACHE/debs" "$ROOT"
  # apt's download sandbox user must be able to write there
  chmod 0777 "$CACHE/debs"
  (cd "$CACHE/debs" && apt-get download -qq "${DEBS[@]/%/:arm64}")
  for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$ROOT"; done
  # what update-alternatives would have made (dpkg -x runs no maintainer scripts)
  lib="$ROOT/usr/lib/aarch64-linux-gnu"
  ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
  ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
  # qemu -L falls back to the host's file when the sysroot lacks a path: keep the host's
  # (x86-64) site-packages out of the emulated python's sys.path
  for d in usr/local/lib/python3.11/dist-packages usr/local/lib/python3/dist-packages \
           usr/lib/python3.11/site-packages usr/local/lib/python3.11/site-packages; do
    mkdir -p "$ROOT/$d"
  done
  touch "$ROOT/.done"
fi
stage "arm64 sysroot (Debian debs)" "$t0"

# --- the emulated python, and a wrapper for sys.executable --------------------------------
mkdir -p "$BIN"
cat > "$BIN/python3.11" <<EOF
#!/bin/sh
# the aarch64 python3.11 of $ROOT under qemu-user; argv[0] (-0) makes this script its
# sys.executable, so that the child processes the tests start run under qemu too
exec "$(command -v "$QEMU")" -L "$ROOT" -0 "\$0" "$ROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$BIN/python3.11"
ln -sf python3.11 "$BIN/python3"
ln -sf python3.11 "$BIN/python"
export PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1
unset PYTHONHOME
# OpenMP's waiting threads sleep instead of spinning (tools/aarch64_digests.sh: under qemu,
# spinning threads make many short steps much slower)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
A64PY="$BIN/python3.11"
# dpkg -x runs no py3compile and PYTHONDONTWRITEBYTECODE is set (so that no .pyc is written
# through qemu's path redirection): compile the sysroot's and the wheels' modules once, in
# place, or every emulated python start (the tests start many) compiles them from source.
# With the host python when it is 3.11 (the same bytecode), else with the emulated one.
precompile() {  # <dir>...: .pyc with the paths the emulated python sees (ROOT stripped)
  local py=("$A64PY")
  if "$HOSTPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    py=("$HOSTPY")
  fi
  PYTHONDONTWRITEBYTECODE= "${py[@]}" -m compileall -q -j 2 -s "$ROOT" -p / "$@" >/dev/null || true
}
if [ ! -e "$ROOT/.compiled" ]; then
  t1=$SECONDS
  echo "== precompiling the sysroot's python modules"
  precompile "$ROOT/usr/lib/python3.11" "$ROOT/usr/lib/python3/dist-packages"
  touch "$ROOT/.compiled"
  stage "precompile sysroot" "$t1"
fi

# --- test dependencies: aarch64 wheels (numpy stays Debian's) -----------------------------
t0=$SECONDS
if [ ! -e "$SITE/.done" ]; then
  echo "== test dependencies (aarch64 wheels) into $SITE"
  rm -rf "$SITE" "$CACHE/wheels"
  mkdir -p "$CACHE/wheels"
  # ml_dtypes < 0.6: 0.6 and later require numpy >= 2, Debian bookworm's is 1.24
  "$HOSTPY" -m pip download -q -d "$CACHE/wheels" --only-binary=:all: \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
      --abi cp311 --no-deps "pytest>=7" "$HYPOTHESIS_PIN" "ml_dtypes${ML_DTYPES_SPEC:->=0.3,<0.6}" \
      iniconfig packaging pluggy pygments sortedcontainers attrs
  "$HOSTPY" -m pip install -q --root-user-action=ignore --target "$SITE" --no-deps --no-compile \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
      --abi cp311 --only-binary=:all: "$CACHE"/wheels/*.whl
  precompile "$SITE"
  touch "$SITE/.done"
fi
# NumPy >= 2 headers for compiling the extension (pyproject's build requirement: _core.pyx
# cimports numpy, and Cython 3's numpy declarations need the NumPy 2 C API); the extension
# built so runs with NumPy 1.x too. From the aarch64 wheel: its _numpyconfig.h is aarch64's.
NPINC="$CACHE/build-numpy/numpy/_core/include"
if [ ! -e "$CACHE/build-numpy/.done" ] || [ ! -e "$CACHE/build-numpy/numpy/__init__.pxd" ]; then
  echo "== NumPy >= 2 headers and .pxd (aarch64 wheel) into $CACHE/build-numpy"
  rm -rf "$CACHE/build-numpy" "$CACHE/wheels-build"
  mkdir -p "$CACHE/wheels-build"
  "$HOSTPY" -m pip download -q -d "$CACHE/wheels-build" --only-binary=:all: \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
      --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp \
      --abi cp311 --no-deps "numpy${BUILD_NUMPY_SPEC:->=2.0}"
  "$HOSTPY" - "$CACHE/build-numpy" "$CACHE"/wheels-build/numpy-*.whl <<'PYEOF'
import sys, zipfile
dest, whl = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    # the C headers, and the .pxd that `cimport numpy` reads (Cython 3.1+ ships none)
    z.extractall(dest, [n for n in z.namelist() if n.startswith("numpy/_core/include/")
                        or (n.startswith("numpy/__init__") and n.endswith(".pxd"))])
print("numpy headers from", whl.rsplit("/", 1)[-1])
PYEOF
  touch "$CACHE/build-numpy/.done"
fi
stage "test dependencies (wheels)" "$t0"

# --- cross-build the extension -------------------------------------------------------------
t0=$SECONDS
# rebuilt only when the C sources, the Cython sources or this script changed
SO="_core.cpython-311-aarch64-linux-gnu.so"
stamp="$(cat csrc/*.c csrc/*.h csrc/*/* src/fastadam/_core.pyx src/fastadam/_cfastadam.pxd \
         "$NPINC/numpy/_numpyconfig.h" "$SCRIPT" | sha256sum | cut -d' ' -f1)"
if [ -s "$BUILD/$SO" ] && [ "$(cat "$BUILD/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "== fastadam._core for aarch64: up to date in $BUILD"
else
echo "== cross-building fastadam._core for aarch64 in $BUILD"
rm -rf "$BUILD"
mkdir -p "$BUILD"
# -I build-numpy: `cimport numpy` reads that wheel's numpy/__init__.pxd, whichever NumPy (if
# any) the host python has
PYTHONPATH="$CYTHON_PATH" "$HOSTPY" -m cython -3 --fast-fail -I csrc -I "$CACHE/build-numpy" \
    src/fastadam/_core.pyx \
    -o "$BUILD/_core.c"
# CMake Release: -O3 -DNDEBUG everywhere; the core adds its own flags; OpenMP on all
# (fastadam_core links OpenMP PUBLIC); FA_HAVE_NEON on every file of the core.
REL=(-O3 -DNDEBUG -fPIC -fopenmp)
CORE=("${REL[@]}" -std=gnu99 -O3 -ffp-contract=off -fno-math-errno -Icsrc -DFA_HAVE_NEON)
NOVEC=(-fno-tree-vectorize -fno-tree-slp-vectorize)
PYINC=(-I"$ROOT/usr/include" -I"$ROOT/usr/include/python3.11" -I"$ROOT/usr/include/aarch64-linux-gnu/python3.11")
compile() {  # at most 2 compiles at a time; a failed one leaves no object (checked below)
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
  "$CC_ARM" "$@" &
}
compile "${REL[@]}" -I"$NPINC" "${PYINC[@]}" -Icsrc -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION \
    -Werror=implicit-function-declaration \
    -c "$BUILD/_core.c" -o "$BUILD/_core.o"
compile "${CORE[@]}" -c csrc/isa_neon.c -o "$BUILD/isa_neon.o"
compile "${CORE[@]}" "${NOVEC[@]}" -c csrc/isa_scalar.c -o "$BUILD/isa_scalar.o"
for src in engine rules formats dispatch; do
  compile "${CORE[@]}" -c "csrc/$src.c" -o "$BUILD/$src.o"
done
wait
OBJS=("$BUILD"/{_core,engine,rules,formats,dispatch,isa_scalar,isa_neon}.o)
for o in "${OBJS[@]}"; do
  [ -s "$o" ] || { echo "aarch64 python: cross-build failed ($(basename "$o") missing)" >&2; exit 2; }
done
"$CC_ARM" -shared -fopenmp -o "$BUILD/$SO" "${OBJS[@]}" -lm
echo "$stamp" > "$BUILD/.stamp"
fi
rm -rf "$PKG"
mkdir -p "$PKG"
# the package: src/fastadam's files (not the Cython sources) and the extension
tar -C src --exclude='__pycache__' --exclude='*.pyx' --exclude='*.pxd' --exclude='*.so' \
    -cf - fastadam | tar -C "$PKG" -xf -
cp "$BUILD/$SO" "$PKG/fastadam/"
stage "cross-build (cython + gcc)" "$t0"

# --- a copy of the tests (nothing is written into the repository) --------------------------
# every file of the tree but src/ (the tests read pyproject.toml, bench/, examples/, csrc/...):
# the working tree's tracked and untracked, not ignored files, or the archived commit's
rm -rf "$TREE"
mkdir -p "$TREE"
if [ -n "${FASTADAM_A64_REF:-}" ]; then
  find . -path ./src -prune -o -type f -print0
else
  git ls-files -z -co --exclude-standard | grep -zv '^src/'
fi | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$TREE" -xf -

export PYTHONPATH="$PKG:$SITE"
t0=$SECONDS
echo "== the emulated python"
"$A64PY" - <<'EOF'
import platform, sys, numpy, fastadam
print("python", sys.version.split()[0], platform.machine(), "numpy", numpy.__version__,
      "sys.executable", sys.executable)
print("fastadam", fastadam.__file__)
print("config", fastadam.config())
c = fastadam.config()
assert platform.machine() == "aarch64", platform.machine()
assert "neon" in c["simd_compiled"], c
EOF
stage "import check" "$t0"

# --- pytest ----------------------------------------------------------------------------------
if [ "$#" -eq 0 ]; then
  set -- tests/test_core.py tests/test_optim.py tests/test_errors.py
elif [ "$1" = all ]; then
  shift
  set -- tests "$@"
fi
echo "== pytest (aarch64 under qemu) $*  FASTADAM_SIMD=${FASTADAM_SIMD:-<auto>}"
t0=$SECONDS
rc=0
cd "$TREE"
timeout_cmd=()
[ -n "${FASTADAM_A64_PYTEST_TIMEOUT:-}" ] && timeout_cmd=(timeout "$FASTADAM_A64_PYTEST_TIMEOUT")
"${timeout_cmd[@]}" "$A64PY" -m pytest -p no:cacheprovider "$@" || rc=$?
stage "pytest" "$t0"
cd "$REPO"

echo "== times (wall)"
printf '%s\n' "${REPORT[@]}"
printf '%-34s %5d s\n' "total" $((SECONDS - t_start))
echo "aarch64 python: pytest exit status $rc"
exit "$rc"
